"""App benchmark on the embedded default: start-to-ready time and slider-change round trip.

    python benchmarks/app_latency.py [--rounds 11]

Starts `python app.py` in a child process, waits until its page answers (start to ready), then drives it
with gradio_client as a script would: sample 4 candidates, fuse once, and move the threshold slider
`rounds` times (each a /refuse_threshold call that returns the updated target), then the end-step slider
`rounds` times to seeded random positions (/refuse_end_step: the target steps before the earlier of the old
and new end are reused, the rest computed). Prints one JSON object.

The round trip is split into the server's share (the fusion handler's own time, which the app reports at the
end of its status line) and the rest (queue, image encoding, transfer, the client). The client reuses one
SSL context: gradio_client otherwise builds a new one, loading the CA bundle, for every HTTP request it makes,
about 0.35 s of CPU per prediction that competes with the server on a small machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--prompt", default="the red circle above the blue square")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tempfile.mkdtemp()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--store", store], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("the app exited during start")
                time.sleep(0.1)
        ready_s = time.perf_counter() - t0
        from gradio_client import Client

        c = Client(url, verbose=False, ssl_verify=ssl.create_default_context())
        c.predict(a.prompt, api_name="/words")
        _, base, ref, _, kws = c.predict(a.prompt, 20, 2.0, 1.0, 4, 0, api_name="/sample")
        args = [a.prompt, 20, 2.0, 1.0, base, ref, kws["value"]]
        t = time.perf_counter()
        c.predict(*args, "auto", 0.5, 3, 20, "mid+up", "smooth", True, None, api_name="/fuse")
        first_fuse_s = time.perf_counter() - t
        times, server = [], []
        for i in range(a.rounds):
            t = time.perf_counter()
            out = c.predict(*args, "relative", 0.2 + 0.05 * i, 3, 20, "mid+up", "smooth", True, None,
                            api_name="/refuse_threshold")
            times.append(time.perf_counter() - t)
            assert "cache" in out[-1], out[-1]
            server.append(float(re.search(r"([0-9.]+) s$", out[-1]).group(1)))
        rest = [x - y for x, y in zip(times, server)]
        # the end-step slider at random positions (seeded): the steps before the earlier of two ends are reused
        rng = random.Random(0)
        end_times, reused = [], []
        for _ in range(a.rounds):
            t = time.perf_counter()
            out = c.predict(*args, "relative", 0.2 + 0.05 * (a.rounds - 1), 3, rng.randint(3, 20), "mid+up", "smooth",
                            True, None, api_name="/refuse_end_step")
            end_times.append(time.perf_counter() - t)
            m = re.search(r"([0-9]+) of [0-9]+ steps reused", out[-1])
            reused.append(int(m.group(1)) if m else 0)
        print(json.dumps({"start_to_ready_s": round(ready_s, 2), "first_fuse_s": round(first_fuse_s, 3),
                          "slider_round_trip_median_s": round(statistics.median(times), 3),
                          "slider_round_trip_s": [round(x, 3) for x in times],
                          "server_fusion_median_s": round(statistics.median(server), 3),
                          "rest_median_s": round(statistics.median(rest), 3),
                          "end_step_round_trip_median_s": round(statistics.median(end_times), 3),
                          "end_step_round_trip_s": [round(x, 3) for x in end_times],
                          "end_step_steps_reused": reused}))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
