"""A fine-tune running in a child process, so the UI stays responsive; watched through its log.jsonl.

The child is the CLI (`python -m dfusion_core train ... --out DIR`), given a TrainConfig: each field that
differs from its default becomes the CLI's flag of the same name. It checkpoints every few steps, so
cancelling loses at most those steps and starting again with the same folder resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config_flags(cfg) -> list[str]:
    """The CLI flags that give a train child this TrainConfig: `--lora-rank 4` for each non-default field."""
    default, flags = type(cfg)(), []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        if value is None:
            raise ValueError(f"{f.name} = None has no CLI flag; leave it at its default")
        values = value if isinstance(value, (tuple, list)) else [value]
        flags += ["--" + f.name.replace("_", "-"), *map(str, values)]
    return flags


class TrainingJob:
    def __init__(self, model: str, data: Path, cfg, out_dir: Path):
        """Train `model` (its folder or id) on the store or pair folder `data` with the TrainConfig `cfg`."""
        self.cfg, self.out, self.total = cfg, Path(out_dir), cfg.steps
        self.args = ["--model", str(model), "--data", str(data), *config_flags(cfg)]
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
