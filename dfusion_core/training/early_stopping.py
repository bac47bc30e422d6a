"""Early stopping on a validation score read at every checkpoint (docs/METHOD.md, "training budget").

A preference fine-tune that runs too long or too hot makes the model worse (the evidence's first round: every arm
ended below the base). The trainer therefore reads a validation score at each checkpoint, keeps the best
checkpoint's adapter in OUT/best, and stops once `patience` checkpoints in a row have not beaten it by more than
`min_delta`. The score is whatever the caller validates with, higher is better: the held-out part of a user's
pair set (DPO implicit accuracy on pairs never trained on) in the CLI and the app, checker accuracy on
validation prompts in the ShapesWorld evidence.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.atomic import write_text_atomic


@dataclass
class EarlyStopping:
    """The validation record of one run; `update` after each checkpoint's validation."""

    patience: int = 3  # checkpoints without improvement before the run stops (0: never stop early)
    min_delta: float = 0.0  # an improvement must beat the best score by more than this
    best_score: float | None = None
    best_step: int | None = None
    since_best: int = 0
    stopped_at: int | None = None

    def update(self, step: int, score: float) -> bool:
        """Record `score` at `step`; True when it is the new best (the caller keeps that checkpoint)."""
        if self.best_score is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.since_best = float(score), int(step), 0
            return True
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped_at = int(step)
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path, patience: int, min_delta: float = 0.0) -> "EarlyStopping":
        """The record a resumed run continues (the run's own patience and delta win over the file's)."""
        path = Path(path)
        if not path.is_file():
            return cls(patience, min_delta)
        d = json.loads(path.read_text()) | {"patience": patience, "min_delta": min_delta}
        return cls(**d)
