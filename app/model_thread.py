"""Every model call of the app runs on one long-lived thread.

Why: PyTorch's CPU kernels run on an OpenMP team owned by the calling thread. The web server hands each event
to whichever of its worker threads is free, so without this the model hops between threads, each growing a
team of its own that competes for the same cores. One thread also serialises the model, whose attention
controller is shared state.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor


class ModelThread:
    def __init__(self, name: str = "dfusion-model"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident = self._pool.submit(threading.get_ident).result()

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread; its result or its exception comes back to the caller."""
        if threading.get_ident() == self._ident:  # already there (a model call made by model work)
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def submit(self, fn, *args, **kwargs) -> Future:
        """fn(*args, **kwargs) on the model thread without waiting for it (the app loads its model so)."""
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
