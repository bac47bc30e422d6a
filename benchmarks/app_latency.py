"""App benchmark on the embedded default: start-up times and slider-change round trip.

    python benchmarks/app_latency.py [--rounds 11] [--startup-only] [--repeat 3]

Start-up: starts `python app.py` in a child process and measures the time until its page answers
(`page_served_s`) and until its log says the model and scorer are loaded (`model_ready_s`; an app that loads
the model before serving is ready when its page is). `--startup-only` repeats just that, `--repeat` times.
Then the benchmark drives the app
with gradio_client as a script would: sample 4 candidates, fuse once, and move the threshold slider
`rounds` times (each a /refuse_threshold call that returns the updated target), then the end-step slider
`rounds` times to seeded random positions (/refuse_end_step: the target steps before the earlier of the old
and new end are reused, the rest computed). Last, a drag: `--drag-moves` threshold moves sent `--drag-gap` s
apart without waiting, quiet and then beside `--load` busy processes (a loaded machine): the time from each move
to its first answer (the target's preview, or the pair), from the last move to its pair, and how many moves ended
superseded by a newer one (stale work stopped, not queued). Prints one JSON object.

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
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "model ready"  # what app.py logs once the model (and scorer) can serve requests


def start_app(port: int, store: str, ready_timeout: float = 120, model: str | None = None
              ) -> tuple[subprocess.Popen, float, float]:
    """Start app.py; (process, seconds until its page answers, seconds until it logs READY_LINE, or until its page
    answers when no such line comes within `ready_timeout` s of that: an app that loads before serving)."""
    t0 = time.perf_counter()
    extra = ["--model", model] if model else []
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--store", store, *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ})
    ready = threading.Event()
    times = {}

    def read_log():
        for line in proc.stderr:  # drained to the end, so the child never blocks on a full pipe
            if READY_LINE in line and not ready.is_set():
                times["ready"] = time.perf_counter() - t0
                ready.set()
    threading.Thread(target=read_log, daemon=True).start()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the app exited during start")
            time.sleep(0.05)
    page_s = time.perf_counter() - t0
    if not ready.wait(timeout=ready_timeout) and proc.poll() is not None:
        raise SystemExit("the app exited while loading the model")
    return proc, page_s, times.get("ready", page_s)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy(n: int) -> list[subprocess.Popen]:
    """n processes that keep one core each busy (the loaded case)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def drag(c, args: list, moves: int, gap: float, start: float) -> dict:
    """`moves` threshold moves from `start`, `gap` s apart, none waited for; each move's first answer and the last
    one's pair (a drag of its own: no position of an earlier drag, whose result could be reused)."""
    jobs, sent, first = [], [], {}
    for i in range(moves):
        sent.append(time.perf_counter())
        jobs.append(c.submit(*args, "relative", round(start + 0.02 * i, 3), 3, 20, "mid+up", "smooth", True, None,
                             api_name="/refuse_threshold"))
        deadline = time.perf_counter() + gap
        while time.perf_counter() < deadline:
            _note_first(jobs, first)
            time.sleep(0.01)
    while not jobs[-1].done():
        _note_first(jobs, first)
        time.sleep(0.01)
    done_s = time.perf_counter() - sent[-1]
    _note_first(jobs, first)
    finals = [j.result(timeout=600)[-1] for j in jobs]
    return {"first_answer_s": [round(first[i] - sent[i], 3) if i in first else None for i in range(moves)],
            "last_move_to_pair_s": round(done_s, 3),
            "superseded": sum("superseded" in f for f in finals),
            "last_status": finals[-1]}


def _note_first(jobs, first: dict) -> None:
    for i, j in enumerate(jobs):
        if i not in first and (j.outputs() or j.done()):
            first[i] = time.perf_counter()


def startup_only(repeat: int, ready_timeout: float, model: str | None) -> None:
    runs = []
    for _ in range(repeat):
        proc, page_s, ready_s = start_app(free_port(), tempfile.mkdtemp(), ready_timeout, model)
        stop(proc)
        runs.append((page_s, ready_s))
    print(json.dumps({"page_served_s": [round(p, 2) for p, _ in runs],
                      "model_ready_s": [round(r, 2) for _, r in runs],
                      "load_average": [round(x, 2) for x in os.getloadavg()]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--prompt", default="the red circle above the blue square")
    ap.add_argument("--model", default=None, help="a pipeline folder for app.py --model (default: the embedded one)")
    ap.add_argument("--startup-only", action="store_true", help="measure the start-up alone")
    ap.add_argument("--repeat", type=int, default=3, help="start-ups measured with --startup-only")
    ap.add_argument("--drag-moves", type=int, default=5, help="threshold moves of the drag (5)")
    ap.add_argument("--drag-gap", type=float, default=0.3, help="seconds between two moves of the drag (0.3)")
    ap.add_argument("--load", type=int, default=2, help="busy processes beside the loaded drag (2)")
    ap.add_argument("--ready-timeout", type=float, default=120,
                    help=f"seconds to wait after the page for the log's '{READY_LINE}' (0 for an app without it)")
    a = ap.parse_args()
    if a.startup_only:
        return startup_only(a.repeat, a.ready_timeout, a.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc, page_s, ready_s = start_app(port, tempfile.mkdtemp(), a.ready_timeout, a.model)
    try:
        from gradio_client import Client

        c = Client(url, verbose=False, ssl_verify=ssl.create_default_context())
        c.predict(a.prompt, api_name="/words")
        _, base, ref, _, kws, _ = c.predict(a.prompt, 20, 2.0, 1.0, 4, 0, api_name="/sample")  # (+ status line)
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
        quiet = drag(c, args, a.drag_moves, a.drag_gap, start=0.21)
        load = busy(a.load)
        try:
            loaded = drag(c, args, a.drag_moves, a.drag_gap, start=0.22)
        finally:
            for p in load:
                p.kill()
        print(json.dumps({"page_served_s": round(page_s, 2), "model_ready_s": round(ready_s, 2),
                          "load_average": [round(x, 2) for x in os.getloadavg()],
                          "first_fuse_s": round(first_fuse_s, 3),
                          "slider_round_trip_median_s": round(statistics.median(times), 3),
                          "slider_round_trip_s": [round(x, 3) for x in times],
                          "server_fusion_median_s": round(statistics.median(server), 3),
                          "rest_median_s": round(statistics.median(rest), 3),
                          "end_step_round_trip_median_s": round(statistics.median(end_times), 3),
                          "end_step_round_trip_s": [round(x, 3) for x in end_times],
                          "end_step_steps_reused": reused,
                          "drag_quiet": quiet, f"drag_beside_{a.load}_busy": loaded}))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
