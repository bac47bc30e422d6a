"""A fine-tune running in a child process, so the UI stays responsive; watched through its log.jsonl.

The child is the CLI (`python -m dfusion_core train ... --out DIR`, or `train-on-policy` for DDPO / DPOK
rounds), given a TrainConfig (OnPolicyConfig): each field that differs from its default becomes the CLI's flag of
the same name. It checkpoints every few steps (on-policy: after every round), so cancelling loses at most those
and starting again with the same folder resumes.
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


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a log a child is still writing (a torn last line is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return out


class TrainingJob:
    command = "train"

    def __init__(self, model: str, data: Path, cfg, out_dir: Path):
        """Train `model` (its folder or id) on the store or pair folder `data` with the TrainConfig `cfg`."""
        self._setup(cfg, out_dir, cfg.steps, ["--model", str(model), "--data", str(data), *config_flags(cfg)])

    def _setup(self, cfg, out_dir: Path, total: int, args: list[str]) -> None:
        self.cfg, self.out, self.total, self.args = cfg, Path(out_dir), total, args
        self.proc: subprocess.Popen | None = None
        self.cancelled = False
        self._stderr: list[str] = []

    def progress(self) -> tuple[str, float]:
        """('step s/N', fraction done) from the log."""
        rows = self.rows()
        step = rows[-1]["step"] if rows else 0
        return f"step {step}/{self.total}", step / max(1, self.total)

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.cancelled = False
        self.proc = subprocess.Popen([sys.executable, "-m", "dfusion_core", self.command, *self.args, "--out", str(self.out)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-50]

    def rows(self) -> list[dict]:
        """The optimizer steps' rows (loss, lr, ...)."""
        return [r for r in read_jsonl(self.out / "log.jsonl") if "stage" not in r]

    def validation(self) -> tuple[list[dict], dict | None]:
        """(held-out validation rows, the early-stopping verdict once the run ended) from the log."""
        rows = read_jsonl(self.out / "log.jsonl")
        ended = [r for r in rows if r.get("stage") == "early_stopping"]
        return [r for r in rows if r.get("stage") == "validation"], (ended[-1] if ended else None)

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


class OnPolicyJob(TrainingJob):
    """DDPO / DPOK in on-policy rounds on `prompts` with the scorer `scorer` (a scorer name the CLI reads):
    each round samples from the current LoRA, pairs (fused targets vs bases, or random pairs), scores, trains."""

    command = "train-on-policy"

    def __init__(self, model: str, prompts: list[str], scorer: str, num_candidates: int, cfg, out_dir: Path):
        self.prompts = list(prompts)  # what the rounds train on (before / after leaves them out)
        prompt_flags = [x for p in prompts for x in ("--prompt", p)]
        self._setup(cfg, out_dir, cfg.rounds, ["--model", str(model), *prompt_flags, "--scorer", scorer,
                                               "--num-candidates", str(num_candidates), *config_flags(cfg)])

    def rounds(self) -> list[dict]:
        return read_jsonl(self.out / "rounds.jsonl")

    def progress(self) -> tuple[str, float]:
        """('round r/R, step s', fraction of rounds done)."""
        done, rows = self.rounds(), self.rows()
        text = f"round {len(done)}/{self.total} done, step {rows[-1]['step'] if rows else 0}"
        if done and done[-1].get("reward_mean") is not None:
            text += f" · last round's mean reward {done[-1]['reward_mean']:.3f}"
        return text, len(done) / max(1, self.total)
