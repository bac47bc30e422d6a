"""What every part of the app service shares: the limits, the per-visitor Session, the error meant for the
screen, and the checks of typed values (seeds, prompts)."""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfusion_core.engine.config import SamplingParams
from dfusion_core.engine.fusion import FusionResult
from dfusion_core.engine.sampling import MAX_SEED, Trajectory, validate_prompt
from dfusion_core.pairs.prompt_sets import load_prompt_set
from dfusion_core.worlds import discover as discover_worlds
from dfusion_core.worlds.registry import world_of
from dfusion_core.data.sharing import portable_name
from dfusion_core.engine.schema import shown


MAX_CANDIDATES = 32
TUNED_ADAPTER = "dfusion_tuned"  # name prefix of the fine-tuned LoRA adapters sessions load into the Fuse view
LORA_FILE = "pytorch_lora_weights.safetensors"  # what a finished (or checkpointed) run folder holds
MAX_ROUNDS = 100  # on-policy rounds one app job may run
MAX_ROUND_PROMPTS = 32  # prompts of one app on-policy job (each round samples every one of them)
MAX_COMPARE_PROMPTS = 8  # prompts of one before / after comparison (4 images each)
MAX_TRAINING_JOBS = 2  # fine-tunes running at once, app-wide (each child process loads its own copy of the model)
MAX_ADAPTERS = 8  # LoRA adapters kept on the model; beyond it the least recently used goes (reloaded when needed)
MAX_UNDO_DELETES = 20  # deleted pairs a page keeps for 'Undo delete' (each held whole, in memory)
EXPORT_DIR = Path(tempfile.gettempdir()) / "dfusion-exports"  # the Dataset tab's downloads (gradio serves the temp dir)
PAIR_COLUMNS = ["pair_id", "prompt", "label", "base_seed", "ref_seed", "score_base", "score_target"]  # list_pairs rows


class UserError(ValueError):
    """A message for the person at the screen; `widget` names the control it is about (None: the page's)."""

    def __init__(self, message: str, widget: str | None = None):
        super().__init__(message)
        self.widget = widget


@dataclass
class FuseControls:
    """The Fuse tab's controls as one value, in the order of the /fuse endpoint's inputs after the session (the
    UI's FUSE_INPUTS is built from these names). An API caller may leave out the last four: None takes the
    model's own form (its dfusion.json)."""

    prompt: object = ""
    steps: object = None
    guidance: object = None
    eta: object = None
    base_seed: object = None
    ref_seed: object = None
    keywords: object = None
    threshold_mode: object = "auto"
    threshold: object = 0.5
    start_step: object = None
    end_step: object = None
    layers: object = "mid+up"
    resize: object = "smooth"
    use_mask: object = True
    words: object = None  # the word whose heatmap is shown (not a fusion setting)
    combine: object = None
    union_base: object = None
    dilate: object = None
    hold_outside: object = None


@dataclass
class Candidate:
    seed: int
    image: object
    trajectory: Trajectory
    score: float | None = None
    correct: bool | None = None  # ShapesWorld ground-truth checker, when the prompt is a ShapesWorld caption


class FusionTicket:
    """Which of a session's fusion requests is the newest. Each fusion takes a number when it starts; one whose
    number is no longer the latest stops at its next step (a slider moved again), so a drag never queues stale
    work. Shared by every copy dataclasses.replace makes of a Session; a fresh one per visitor."""

    def __init__(self):
        self._lock = threading.Lock()
        self.latest = self.finished = 0

    def take(self) -> int:
        with self._lock:
            self.latest += 1
            return self.latest

    def stale(self, number: int) -> bool:
        return number != self.latest

    def finish(self, number: int) -> None:
        with self._lock:
            self.finished = max(self.finished, number)

    @property
    def pending(self) -> bool:
        """A newer fusion than the last finished one is on its way (what the page shows is about to change)."""
        return self.latest > self.finished

    def __deepcopy__(self, memo):  # gradio deep-copies the initial Session for each visitor (a lock cannot be)
        return FusionTicket()


@dataclass
class Session:
    """One browser session's working state (gradio keeps one per visitor)."""

    prompt: str = ""
    sampling: SamplingParams | None = None
    candidates: dict[int, Candidate] = field(default_factory=dict)
    result: FusionResult | None = None
    scores: dict = field(default_factory=dict)
    history: list[tuple[str, str | None]] = field(default_factory=list)  # (pair_id, previous label) for undo
    x0_images: list | None = None
    same_pair: bool = False  # the last fusion kept prompt, seeds and sampling: base and reference are unchanged
    weights: str | None = None  # the LoRA folder every model call of this session computes with; None = base
    token: str = ""  # names this session's fine-tune; given at its first (gradio copies one Session to every visitor)
    fusions: FusionTicket = field(default_factory=FusionTicket, repr=False, compare=False)


def parse_seed(value, name: str) -> int:
    """A seed from a widget value: integer text or number in 0..MAX_SEED (the engine's seed range)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{name} is empty: type an integer seed or pick a candidate")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer, got {shown(value)}") from None
    if not np.isfinite(f) or f != int(f):
        raise UserError(f"{name} must be a whole number, got {shown(value)}")
    seed = int(f)
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def example_prompts(defaults: dict | None = None) -> list[str]:
    """A few prompts of each prompt set that fits the model: its world's sets (a model trained on a world draws
    only that world's grammar), else the paper's. The Fuse tab's examples and the before / after prompts."""
    discover_worlds()
    world = world_of(defaults or {})
    specs = world.example_sets if world is not None else ("paper:action:train", "paper:attribute:train",
                                                          "paper:spatial:train")
    out = []
    for spec in specs:
        try:
            out += [e.prompt for e in load_prompt_set(spec)[:4]]
        except ValueError:
            continue
    return out


def score_cell(score) -> float | None:
    """A score as a table shows it: 3 decimals, as everywhere on the page (not the float's 16)."""
    return None if score is None else round(float(score), 3)


def model_name(source: str | Path) -> str:
    """A model's (or run folder's) name for the page: portable_name (no machine's absolute paths on the page)."""
    return portable_name(source)


def check_prompt(prompt) -> str:
    """The engine's prompt rule (validate_prompt), as a UserError; whitespace runs collapsed."""
    try:
        validate_prompt(prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    return " ".join(prompt.split())


