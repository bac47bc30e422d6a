"""Start the dfusion app: `python app.py` (embedded ShapesWorld model) or `python app.py --model FOLDER`.

The page is served first; the model and the scorer load behind it (the page shows their status)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import dfusion_core  # noqa: F401  (offline environment before gradio / diffusers are imported)


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on (host, port) now (checked before gradio, whose refusal is a traceback)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="diffusers pipeline folder or hub id (default: assets/shapesworld)")
    ap.add_argument("--scorer", default="default",
                    help="'default' (ShapesWorld CLIP when present), 'none', or openclip:NAME:CKPT / a folder")
    ap.add_argument("--store", default=os.environ.get("DFUSION_STORE", "dfusion_data/store"),
                    help="preference store folder (created if missing)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--host", default="0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from dfusion_core.engine.loading import ModelLoadError
    from dfusion_core.pairs.scoring import DEFAULT_SCORER, make_scorer

    from app.service import AppService
    from app.ui import CSS, SHORTCUTS, build_demo

    def scorer():
        if a.scorer == "none" or (a.scorer == "default" and not DEFAULT_SCORER.is_dir()):
            return None
        return make_scorer(None if a.scorer == "default" else a.scorer, device=a.device)

    # The page first: the model and the scorer load behind it, on the model thread; the page says so meanwhile
    # (a folder that is not a model is refused here, before anything is served).
    try:
        svc = AppService(a.model, store_dir=a.store, background=True,
                         load_options={"device": a.device, "dtype": a.dtype}, make_scorer=scorer,
                         scorer_source=None if a.scorer == "none" else a.scorer)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not port_is_free(a.host, a.port):
        print(f"error: port {a.port} on {a.host} is in use (another app?): pass --port N or set PORT", file=sys.stderr)
        return 2
    demo = build_demo(svc)
    demo.queue(default_concurrency_limit=1).launch(server_name=a.host, server_port=a.port, head=SHORTCUTS, css=CSS,
                                                   footer_links=["api"], prevent_thread_lock=True)
    svc.start_loading()
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
