"""A fine-tune running in a child process, so the UI stays responsive; watched through its log.jsonl.

The child is the CLI (`python -m dfusion_core train ... --out DIR`): it checkpoints every few steps, so
cancelling loses at most those steps and starting again with the same folder resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TrainingJob:
    def __init__(self, args: list[str], out_dir: Path, total_steps: int):
        self.args, self.out, self.total = args, Path(out_dir), total_steps
        self.proc: subprocess.Popen | None = None
        self.cancelled = False
        self._stderr: list[str] = []

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.cancelled = False
        self.proc = subprocess.Popen([sys.executable, "-m", "dfusion_core", "train", *self.args, "--out", str(self.out)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-50]

    def rows(self) -> list[dict]:
        log = self.out / "log.jsonl"
        if not log.is_file():
            return []
        out = []
        for line in log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return out

    @property
    def state(self) -> str:
        if self.proc is None:
            return "idle"
        code = self.proc.poll()
        if code is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "done" if code == 0 else "failed"

    def error(self) -> str:
        lines = [ln for ln in self._stderr if ln.startswith("error:")] or self._stderr[-3:]
        return " ".join(lines)[-500:]

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cancelled = True
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
