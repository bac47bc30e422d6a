"""What the app does, without the UI: validation, one thread for the model, the reference cache, the store.

Every public method takes plain values (as widgets deliver them) or the parameter objects built from them
(`sampling`, `fusion`, `train_config`), validates them and raises UserError with a message meant for the
screen. The UI turns UserError into a toast; nothing here imports gradio. The UI never touches the store or
a tensor: every read of the pairs, the masks and the attention maps goes through a method here.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dfusion_core.engine.worlds import explain_prompt, world_of
from dfusion_core.worlds import discover as discover_worlds
from dfusion_core.engine.config import (FUSION_LAYER_PRESETS, FusionParams, SamplingParams,
                                        model_settings)
from dfusion_core.engine.fusion import FusionResult, finish_log_probs, fuse
from dfusion_core.engine.loading import LoadedModel, load_model, peek_model
from dfusion_core.engine.pairs import record_from_result
from dfusion_core.data.preference_store import LABELS, PreferenceStore
from dfusion_core.engine.prompt_sets import load_prompt_set
from dfusion_core.engine.reference_cache import ReferenceCache
from dfusion_core.engine.sampling import MAX_SEED, Trajectory, check_pair_seeds, sample, validate_prompt
from dfusion_core.engine.tokens import default_keywords, word_tokens

from .model_thread import ModelThread

if TYPE_CHECKING:
    from dfusion_core.training.trainer import TrainConfig

log = logging.getLogger("dfusion.app")
MAX_CANDIDATES = 32
TUNED_ADAPTER = "dfusion_tuned"  # name prefix of the fine-tuned LoRA adapters sessions load into the Fuse view
LORA_FILE = "pytorch_lora_weights.safetensors"  # what a finished (or checkpointed) run folder holds
MAX_ROUNDS = 100  # on-policy rounds one app job may run
MAX_ROUND_PROMPTS = 32  # prompts of one app on-policy job (each round samples every one of them)
MAX_TRAINING_JOBS = 2  # fine-tunes running at once, app-wide (each child process loads its own copy of the model)
MAX_ADAPTERS = 8  # LoRA adapters kept on the model; beyond it the least recently used goes (reloaded when needed)
MAX_UNDO_DELETES = 20  # deleted pairs a page keeps for 'Undo delete' (each held whole, in memory)
EXPORT_DIR = Path(tempfile.gettempdir()) / "dfusion-exports"  # the Dataset tab's downloads (gradio serves the temp dir)
PAIR_COLUMNS = ["pair_id", "prompt", "label", "base_seed", "ref_seed", "score_base", "score_target"]  # list_pairs rows


class UserError(ValueError):
    """A message for the person at the screen."""


@dataclass
class Candidate:
    seed: int
    image: object
    trajectory: Trajectory
    score: float | None = None
    correct: bool | None = None  # ShapesWorld ground-truth checker, when the prompt is a ShapesWorld caption


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


def parse_seed(value, name: str) -> int:
    """A seed from a widget value: integer text or number in 0..MAX_SEED (the engine's seed range)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{name} is empty: type an integer seed or pick a candidate")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer, got {value!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise UserError(f"{name} must be a whole number, got {value!r}")
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


def model_name(source: str) -> str:
    """A model's name for the page: a folder under the working directory by its relative path, another folder by
    its name, a hub id as it is (no machine's absolute paths in the title)."""
    p = Path(source)
    if not p.is_absolute():
        return source
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name or source


def check_prompt(prompt) -> str:
    """The engine's prompt rule (validate_prompt), as a UserError; whitespace runs collapsed."""
    try:
        validate_prompt(prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    return " ".join(prompt.split())


class AppService:
    def __init__(self, model: LoadedModel | str | None = None, store_dir: str | Path = "dfusion_data/store",
                 scorer=None, cache_bytes: int = 1 << 30, runs_dir: str | Path | None = None,
                 background: bool = False, load_options: dict | None = None, make_scorer=None,
                 scorer_source: str | None = None):
        """`model`: a LoadedModel, or a folder / hub id (None: the embedded model) loaded with `load_options`
        (load_model's device, dtype) - here, or with `background` on the model thread from `start_loading()`
        on, so that the page is served first (see `model`). `make_scorer`: makes the scorer after the model.
        `scorer_source`: the same scorer by name ('default', openclip:..., a folder), for on-policy children."""
        self.model_thread = ModelThread()  # one thread runs every model call, one at a time
        self._model: LoadedModel | None = model if isinstance(model, LoadedModel) else None
        self.load_error = self.scorer_error = self.load_seconds = self._loading = None
        self._load_t0 = time.perf_counter()
        if self._model is None and not background:
            self._model = load_model(model, **(load_options or {}))
        if self._model is not None:
            self.model_defaults = self._model.defaults
            self.model_source = self._model.base_id or self._model.model_id  # the weights the training child loads
        else:  # the folder is checked now (a wrong path is said at once); its weights load behind the page
            self.model_source, self.model_defaults = peek_model(model)
        self.runs_dir = Path(runs_dir) if runs_dir else Path(store_dir).expanduser().parent / "runs"
        self.jobs: dict[str, object] = {}  # session token -> that session's latest TrainingJob
        self.max_jobs = MAX_TRAINING_JOBS
        self._jobs_lock = threading.Lock()
        self._adapters: OrderedDict[str, int] = OrderedDict()  # loaded LoRA folder -> its file's mtime, LRU first
        self._stamps: dict[str, int] = {}  # LoRA folder -> mtime of the weights the cache's entries were made with
        self.scorer = scorer
        self.scorer_source = scorer_source  # the scorer's name for a training child (on-policy rewards)
        self.store = PreferenceStore(store_dir)
        self.cache = ReferenceCache(max_bytes=cache_bytes)
        self._set_defaults(self.model_defaults)
        self._pending = (model, load_options or {}, make_scorer) if self._model is None else None
        if self._model is not None and make_scorer is not None:
            self.scorer = make_scorer()

    def _set_defaults(self, defaults: dict) -> None:
        """The model's defaults (its dfusion.json over the paper's) and the parameters the tabs open on."""
        self.model_defaults = defaults
        self.default_sampling, self.default_fusion = model_settings(defaults)  # the Fuse tab opens on the model's form
        self.default_mask = self.default_fusion.mask

    # ---- the model, loaded behind the page -------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        """The loaded model; until it is loaded (or when loading failed) a UserError that says so, which every
        handler shows as it shows a refused input."""
        if self._model is None:
            raise UserError(self.model_status())
        return self._model

    @model.setter
    def model(self, value: LoadedModel) -> None:
        self._model = value

    @property
    def ready(self) -> bool:
        return self._model is not None

    def start_loading(self) -> None:
        """Start the background load (app.py: once the page is served, so that the two do not share the CPU)."""
        if self._pending is not None and self._loading is None:
            self._load_t0 = time.perf_counter()
            self._loading = self.model_thread.submit(self._load, *self._pending)

    def _load(self, model, options: dict, make_scorer) -> None:
        """Load the model, then the scorer (on the model thread); a failure is kept for model_status."""
        def why(e: Exception) -> str:
            return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        try:
            loaded = load_model(model, **options)
        except Exception as e:  # noqa: BLE001 - said on the page (model_status) and in the log
            self.load_error = why(e)
            log.error("could not load the model: %s", self.load_error)
            return
        try:
            self.scorer = make_scorer() if make_scorer is not None else self.scorer
        except Exception as e:  # noqa: BLE001 - the model works without scores; the page says why there are none
            self.scorer_error = why(e)
            log.error("could not load the scorer: %s", self.scorer_error)
        self._set_defaults(loaded.defaults)  # a hub id's defaults are known only now
        self.load_seconds = time.perf_counter() - self._load_t0
        self._model = loaded
        log.info("model ready in %.1f s: %s", self.load_seconds, self.model_source)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for a background load to end (at most `timeout` s); whether the model is ready."""
        if self._loading is not None:
            try:
                self._loading.result(timeout)
            except TimeoutError:
                pass
        return self.ready

    def model_status(self) -> str:
        """A line for the page: the model is loading (and for how long so far), failed to load, or ready."""
        name = model_name(self.model_source)
        if self._model is not None:
            took = f" (loaded in {self.load_seconds:.1f} s)" if self.load_seconds is not None else ""
            none = f"; no scores: the scorer could not be loaded ({self.scorer_error})" if self.scorer_error else ""
            return f"model `{name}` ready{took}{none}"
        if self.load_error is not None:
            return f"the model `{name}` could not be loaded: {self.load_error}"
        return (f"the model `{name}` is still loading ({time.perf_counter() - self._load_t0:.0f} s so far): "
                "sampling and fusing start when it is ready; the Dataset tab works now")

    # ---- inputs -> parameters -------------------------------------------------------------------
    def sampling(self, steps, guidance, eta) -> SamplingParams:
        try:
            return replace(self.default_sampling, num_steps=int(steps), guidance_scale=float(guidance),
                           eta=float(eta)).validate()
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None

    def fusion(self, num_steps: int, keywords, threshold_mode, threshold, start_step, end_step, layers, resize,
               use_mask, union_base=None, dilate=None, feather=0.0, combine=None, hold_outside=None) -> FusionParams:
        """The Fuse controls' values as checked FusionParams; union_base, dilate and hold_outside left None take
        the model's defaults (its dfusion.json)."""
        d = self.default_fusion
        union_base = d.mask.union_base if union_base is None else union_base
        dilate = d.mask.dilate if dilate is None else dilate
        hold_outside = d.hold_outside if hold_outside is None else hold_outside
        if layers not in FUSION_LAYER_PRESETS:
            raise UserError(f"layers must be one of {', '.join(FUSION_LAYER_PRESETS)}")
        try:
            start, end = int(start_step), int(end_step)
        except (TypeError, ValueError):
            raise UserError("the fusion step range must be whole numbers") from None
        if start > end:
            raise UserError(f"the fusion range starts at step {start}, after its end at step {end}")
        if keywords is not None and len(keywords) == 0:
            raise UserError("no keyword selected: tick at least one word for the mask (or turn the mask off)")
        try:
            mask = replace(self.default_mask, keywords=tuple(keywords) if keywords else None,
                           threshold_mode=threshold_mode, threshold=float(threshold), resize=resize,
                           union_base=bool(union_base), dilate=int(dilate), feather=float(feather),
                           combine=combine or self.default_mask.combine)
            return FusionParams(start_step=start, end_step=end, layers=layers, use_mask=bool(use_mask),
                                hold_outside=bool(hold_outside), mask=mask).validate(num_steps)
        except ValueError as e:
            raise UserError(str(e)) from None

    def prompt_notes(self, prompt) -> list[str]:
        """Warnings about a prompt the model cannot draw as typed (none for an empty or refused prompt: the
        prompt's check says why): its end cut by the CLIP text encoder's 77-token limit, and for a model trained
        on a world with a grammar, words outside the world's vocabulary or a sentence outside its grammar."""
        try:
            prompt = check_prompt(prompt)
        except UserError:
            return []
        notes = explain_prompt(self.model_defaults, prompt)
        if self._model is not None:
            cut = [w for w in word_tokens(self._model.tokenizer, prompt, warn=False) if w.truncated]
            if cut:
                rest = prompt[cut[0].start:]
                rest = rest if len(rest) <= 60 else rest[:57] + "..."
                who = ("only T5 reads it, so those words' masks come from T5's tokens alone" if self._model.t5_length
                       else "the model never sees it, and those words cannot be mask keywords")
                notes.insert(0, f"the prompt is longer than the CLIP text encoder reads (77 tokens): from "
                                f"'{rest}' on it is cut ({len(cut)} words; {who})")
        return notes

    # ---- actions -----------------------------------------------------------------------------------
    def words(self, prompt: str) -> tuple[list[tuple[str, str]], list[str]]:
        """(label, word) choices for the token picker and the default keywords."""
        prompt = check_prompt(prompt)
        ws = word_tokens(self.model.tokenizer, prompt, warn=False)
        choices, seen = [], set()
        for w in ws:  # shown as typed; a word past the 77-token limit is listed, and marked so
            if not w.lexical or w.word.casefold() in seen:
                continue
            seen.add(w.word.casefold())
            pieces = [p for p in w.pieces if p]
            label = w.word if len(pieces) <= 1 else f"{w.word} ({'·'.join(pieces)})"
            choices.append((f"{w.word} (past the 77-token limit)" if w.truncated else label, w.word))
        return choices, default_keywords(self.model.tokenizer, prompt)

    def check_keywords(self, prompt: str, keywords) -> None:
        """The engine's keyword rule without a model call: each keyword is words of the prompt the text
        encoder sees (the app's validator shows the message on the keyword boxes before any fusion)."""
        try:
            self.model.family.token_groups(self.model, prompt, list(keywords))
        except ValueError as e:
            raise UserError(str(e)) from None

    def sample_candidates(self, session: Session, prompt, n, first_seed, sampling: SamplingParams) -> Session:
        prompt = check_prompt(prompt)
        n = int(n)
        if not 1 <= n <= MAX_CANDIDATES:
            raise UserError(f"the number of candidates must be between 1 and {MAX_CANDIDATES}")
        seed0 = parse_seed(first_seed, "first seed")
        seeds = [(seed0 + i) % (MAX_SEED + 1) for i in range(n)]
        res = self._run(session, sample, self.model, prompt, seeds, sampling)
        scores = self.score(res.images, prompt)
        session = Session(prompt=prompt, sampling=sampling, history=session.history, weights=session.weights,
                          token=session.token)
        verdicts = self.check(res.images, prompt)
        for i, (s, im, tr) in enumerate(zip(seeds, res.images, res.trajectories)):
            session.candidates[s] = Candidate(s, im, tr, None if scores is None else float(scores[i]),
                                              None if verdicts is None else verdicts[i])
        return session

    @staticmethod
    def suggested_seeds(session: Session) -> tuple[int, int]:
        """(base, reference) to fuse first: the highest-scored candidate the world's checker passes and the
        lowest-scored one it rejects (build-pairs --pick checker); without a checker verdict on a side, the
        highest / lowest score there is; unscored, the last and first candidates."""
        cands = list(session.candidates.values())
        if all(c.score is not None for c in cands):
            passing = [c for c in cands if c.correct] or cands
            failing = [c for c in cands if c.correct is False] or cands
            best = max(passing, key=lambda c: c.score).seed
            worst = min(failing, key=lambda c: c.score).seed
        else:
            best, worst = cands[-1].seed, cands[0].seed
        if best == worst:
            best = next((c.seed for c in reversed(cands) if c.seed != worst), best)
        return worst, best

    def example_prompts(self) -> list[str]:
        return example_prompts(self.model_defaults)

    def has_checker(self) -> bool:
        """Whether the model's world has a ground-truth checker (its verdicts follow the scores)."""
        world = world_of(self.model_defaults)
        return world is not None and world.check is not None

    def check(self, images, prompt: str) -> list[bool] | None:
        """The ground-truth checker's verdicts when the model was trained on a registered world; None elsewhere."""
        world = world_of(self.model_defaults)
        if world is None or world.check is None:
            return None
        return world.check(images, prompt)

    def score(self, images, prompt: str):
        if self.scorer is None:
            return None
        return np.asarray(self.model_thread.run(self.scorer, images, [prompt] * len(images)), dtype=float)

    # ---- the weights each session computes with -------------------------------------------------------
    # Every model call of a session runs on the model thread right after `_use(session.weights)`: peft keeps
    # each loaded LoRA as a named adapter, switching is a flag per layer, base = every adapter off. The model id
    # (base, or base+lora:FOLDER) follows the switch, and it leads the reference cache's key and every result's
    # model_id: a cached reference is found only under the weights that computed it (one user re-fusing keeps
    # hitting the cache while another computes with other weights), and a stored pair names its weights.
    def _adapter(self, folder: str) -> str:
        """The adapter name of a LoRA folder, loaded on first use and again when its weights file changed (a
        resumed run's later checkpoint); beyond MAX_ADAPTERS the least recently used goes. Model thread only."""
        name = self._adapter_name(folder)
        try:
            stamp = (Path(folder) / LORA_FILE).stat().st_mtime_ns
        except OSError:
            raise UserError(f"the fine-tuned weights in {folder} are gone: go back to the base weights") from None
        if self._adapters.get(folder) != stamp or name not in self.model.lora_folders:
            try:
                self.model.load_lora(folder, name)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                self._adapters.pop(folder, None)
                raise UserError(f"could not load the LoRA in {folder}: {str(e).splitlines()[0]}") from None
            if self._stamps.setdefault(folder, stamp) != stamp:  # new weights under the same model id
                self.cache.forget(self.model.model_id)
                self._stamps[folder] = stamp
            self._adapters[folder] = stamp
        self._adapters.move_to_end(folder)
        while len(self._adapters) > MAX_ADAPTERS:
            old, _ = self._adapters.popitem(last=False)
            self.model.unload_lora(self._adapter_name(old))
        return name

    @staticmethod
    def _adapter_name(folder: str) -> str:
        return f"{TUNED_ADAPTER}_{hashlib.sha1(folder.encode()).hexdigest()[:12]}"

    def _use(self, weights: str | None) -> None:
        """Compute with these weights (a LoRA folder, or None = the base) from now on. Model thread only."""
        self.model.use_lora(None if weights is None else self._adapter(weights))

    def _run(self, session: Session, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread, computing with the session's weights."""
        def call():
            self._use(session.weights)
            return fn(*args, **kwargs)
        return self.model_thread.run(call)

    def weights_id(self, session: Session) -> str:
        """The model id the session's calls compute with (what its stored pairs are labelled with)."""
        base = self.model.base_id  # as the model spells it: results carry the model's own id
        return base if session.weights is None else f"{base}+lora:{session.weights}"

    def weights_text(self, session: Session) -> str:
        """The line under the header: the weights this session computes with."""
        if session.weights is None:
            return f"This session computes with the base weights `{model_name(self.model_source)}`."
        return (f"This session computes with the fine-tuned LoRA `{session.weights}` on "
                f"`{model_name(self.model_source)}` (other sessions keep their own weights).")

    @staticmethod
    def pair_seeds(base_seed, ref_seed) -> tuple[int, int]:
        """A pair's two seeds from widget values: each a seed, and two different images."""
        b, r = parse_seed(base_seed, "base seed"), parse_seed(ref_seed, "reference seed")
        try:
            check_pair_seeds(b, r)  # the engine's rule, the CLI's too
        except ValueError as e:
            raise UserError(str(e)) from None
        return b, r

    def fuse(self, session: Session, prompt, base_seed, ref_seed, sampling: SamplingParams,
             fusion: FusionParams) -> Session:
        prompt = check_prompt(prompt)
        b, r = self.pair_seeds(base_seed, ref_seed)
        same = session.prompt == prompt and session.sampling == sampling
        cand = session.candidates.get(b) if same else None
        try:
            res = self._run(session, fuse, self.model, prompt, b, r, sampling, fusion,
                            base=cand.trajectory if cand else None, cache=self.cache,
                            base_image=cand.image if cand else None, previous=session.result,
                            exact_log_probs=False)  # a held target's log-probs: recomputed when it is labelled
        except ValueError as e:
            raise UserError(str(e)) from None
        if not same:
            session = replace(session, prompt=prompt, sampling=sampling, candidates={})
        prev = session.result
        unchanged = prev is not None and (prev.prompt, prev.base_seed, prev.ref_seed, prev.sampling) == (prompt, b, r, sampling)
        roles = ("target",) if unchanged else ("base", "reference", "target")  # base / reference scores stay valid
        images = {"base": res.base_image, "reference": res.reference_image, "target": res.target_image}
        scores = dict(session.scores) if unchanged else {}
        vals = self.score([images[k] for k in roles], prompt)
        if vals is not None:
            scores.update(zip(roles, vals.tolist()))
        verdicts = self.check([images[k] for k in roles], prompt)
        if verdicts is not None:
            scores.update({f"{k} checker": float(v) for k, v in zip(roles, verdicts)})
        session.result, session.scores, session.same_pair = res, scores, unchanged
        session.x0_images = None
        return session

    def ablation(self, session: Session, thresholds=(0.2, 0.4, 0.6)):
        from dfusion_core.engine.ablation import run_ablation

        r = session.result
        if r is None:
            raise UserError("fuse a pair first: the ablation varies the current pair")
        if r.model_id != self.weights_id(session):
            raise UserError("the current pair was fused with other weights than this session's now: fuse it again")
        return self._run(session, run_ablation, self.model, r.prompt, r.base_seed, r.ref_seed, r.sampling,
                         r.fusion, cache=self.cache, base=r.base, base_image=r.base_image,
                         scorer=self.scorer, thresholds=[(f"relative {t}", t) for t in thresholds])

    # ---- views of the fused pair (arrays for the UI's overlays) ----------------------------------------
    def word_map(self, session: Session, word: str) -> np.ndarray:
        """[h, w] attention of the reference on one word (its tokens' mean), as the word picker shows it."""
        r = session.result
        idx = dict(zip(r.keywords, r.token_groups)).get(word)
        if idx is None:
            try:  # e.g. a word past the 77-token limit: said as such, not as an internal error (T5 may read it)
                idx = self.model.family.token_groups(self.model, r.prompt, [word])[0]
            except ValueError as e:
                raise UserError(str(e)) from None
        return r.token_maps[list(idx)].mean(0).numpy()

    @staticmethod
    def fused_mask(session: Session) -> np.ndarray:
        """[h, w] fusion mask, mean over the fused steps."""
        r = session.result
        first, last = r.fusion.step_range(r.sampling.num_steps)
        return r.masks[first - 1:last].mean(0).numpy()

    @staticmethod
    def mask_coverage(session: Session) -> float:
        """Fraction of the image the mask covers over the fused steps."""
        return session.result.mask_coverage

    def x0_image(self, session: Session, step) -> object:
        """The target's decoded x0 prediction at a 1-based step (clamped to the trajectory)."""
        ims = self.x0_images(session)
        return ims[int(np.clip(int(step), 1, len(ims))) - 1]

    def x0_images(self, session: Session) -> list:
        """Decoded x0 predictions of the target, one per step (the trajectory viewer)."""
        if session.result is None:
            raise UserError("fuse a pair first")
        if session.x0_images is None:
            session.x0_images = self._run(session, self.model.decode, session.result.target.x0_preds)
        return session.x0_images

    def label(self, session: Session, label: str) -> str:
        if session.result is None:
            raise UserError("nothing to label yet: fuse a pair first")
        if label == "skip":
            return "skipped"
        if label not in LABELS:
            raise UserError(f"unknown label {label!r}")
        try:  # a target held outside its mask gets its exact log-probs now, under the weights that fused it
            self._run(session, finish_log_probs, self.model, session.result)
        except ValueError as e:
            raise UserError(str(e)) from None
        rec = record_from_result(session.result, session.result.model_id or self.model_source, session.scores)
        previous = None
        if rec.pair_id in self.store.ids():
            previous = self.store.get(rec.pair_id, with_images=False).label
        self.store.add(rec, label)
        session.history.append((rec.pair_id, previous))
        return f"saved pair {rec.pair_id} as '{label}' ({len(self.store)} in the set)"

    # ---- training ----------------------------------------------------------------------------------
    def train_config(self, algo: str, lora_rank, lr, beta, steps) -> TrainConfig:
        """The Train tab's values as a checked TrainConfig (beta is dpo_beta or traj_beta, by algorithm)."""
        from dfusion_core.training.trainer import ALGOS, TrainConfig

        if algo not in ALGOS:
            raise UserError(f"algorithm must be one of {', '.join(ALGOS)}")
        try:
            rank, steps, lr, beta = int(lora_rank), int(steps), float(lr), float(beta)
            betas = {"dpo": {"dpo_beta": beta}, "traj-dpo": {"traj_beta": beta}}.get(algo, {})
            return TrainConfig(algo=algo, lora_rank=rank, lr=lr, steps=steps, ckpt_every=max(1, min(10, steps)),
                               **betas).validate()
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None

    def on_policy_config(self, algo: str, lora_rank, lr, rounds, arm: str):
        """The Train tab's on-policy values as a checked OnPolicyConfig (DDPO or DPOK rounds)."""
        from dfusion_core.training.onpolicy import ARMS, ON_POLICY_ALGOS, OnPolicyConfig

        if algo not in ON_POLICY_ALGOS:
            raise UserError(f"on-policy rounds train {' or '.join(ON_POLICY_ALGOS)}, not {algo}: DPO and trajectory "
                            "DPO learn from the labelled pairs (Start)")
        if arm not in ARMS:
            raise UserError(f"the rounds' pairs must be one of {', '.join(ARMS)}")
        try:
            rank, rounds, lr = int(lora_rank), int(rounds), float(lr)
        except (TypeError, ValueError):
            raise UserError("LoRA rank, learning rate and rounds must be numbers") from None
        if not 1 <= rounds <= MAX_ROUNDS:
            raise UserError(f"rounds must be between 1 and {MAX_ROUNDS}, got {rounds}")
        try:
            return OnPolicyConfig(algo=algo, lora_rank=rank, lr=lr, rounds=rounds, arm=arm).validate()
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None

    def train_on_policy_start(self, session: Session, cfg, prompts_text: str, num_candidates) -> tuple[Session, str]:
        """DDPO / DPOK rounds on the given prompts in a child process (the CLI's train-on-policy), rewarded by the
        app's scorer: each round samples from the current LoRA, pairs, scores and trains. The session's job."""
        from .jobs import OnPolicyJob

        mine = self._job(session)
        if mine is not None and mine.state == "running":
            raise UserError("this session's fine-tune is still running: cancel it or wait for it to finish")
        if cfg.lora_rank == 0:
            raise UserError("the app trains LoRA adapters (rank >= 1); use the CLI for a full fine-tune")
        if self.default_sampling.eta == 0 or self.default_sampling.flow_sampler == "ode":
            raise UserError(f"{cfg.algo} learns from the sampling steps' log-probabilities; this model samples "
                            "deterministically (eta 0): use the CLI with --eta")
        prompts = list(dict.fromkeys(check_prompt(p) for p in str(prompts_text or "").splitlines() if p.strip()))
        if not prompts:
            raise UserError("give the rounds' prompts, one per line")
        if len(prompts) > MAX_ROUND_PROMPTS:
            raise UserError(f"{len(prompts)} prompts; the app runs at most {MAX_ROUND_PROMPTS} (the CLI any number)")
        try:
            n = int(num_candidates)
        except (TypeError, ValueError):
            raise UserError("candidates per prompt must be a whole number") from None
        if not 4 <= n <= 64:
            raise UserError(f"candidates per prompt must be between 4 and 64 (a round pairs the best quarter with "
                            f"the worst half), got {n}")
        if not self.ready:  # the scorer loads with the model
            raise UserError(self.model_status())
        if self.scorer is None or self.scorer_source is None:
            why = f" (it could not be loaded: {self.scorer_error})" if self.scorer_error else ""
            raise UserError(f"on-policy rounds need the scorer (their rewards are its scores){why}: start the app "
                            "with --scorer default or an OpenCLIP scorer")
        session, out = self._run_folder(session, f"{cfg.algo}-rounds")
        self._launch(session, OnPolicyJob(self.model_source, prompts, self.scorer_source, n, cfg, out))
        return session, (f"started {cfg.algo} rounds ({cfg.arm} pairs) on {len(prompts)} prompt(s), {n} candidates "
                         f"each per round; the run's folder (log, rounds, checkpoints, LoRA weights) is {out}")

    def _run_folder(self, session: Session, kind: str) -> tuple[Session, Path]:
        """A new run's folder under runs_dir, named by kind, time and the session (which gets a token if new)."""
        token = session.token or uuid.uuid4().hex
        out = (self.runs_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{token[:6]}").resolve()
        return replace(session, token=token), out

    def _job(self, session: Session):
        """The session's latest fine-tune (None before its first): other sessions' jobs are not its to see."""
        return self.jobs.get(session.token) if session.token else None

    def _launch(self, session: Session, job) -> None:
        """Start (or restart) a session's job within the app-wide cap on fine-tunes running at once."""
        with self._jobs_lock:
            mine = self._job(session)
            if mine is not None and mine.state == "running":
                raise UserError("this session's fine-tune is still running: cancel it or wait for it to finish")
            running = sum(j.state == "running" for j in self.jobs.values())
            if running >= self.max_jobs:
                raise UserError(f"the app already runs {running} fine-tune{'s' * (running > 1)} for other sessions, "
                                "the most it runs at once: wait for one to finish")
            job.start()
            self.jobs[session.token] = job

    def train_start(self, session: Session, cfg: TrainConfig) -> tuple[Session, str]:
        """Fine-tune a LoRA on the labelled pairs in a child process (batches capped at the number of pairs).
        The job belongs to the session: its status, cancel, resume, load and before / after act on it alone."""
        from dfusion_core.training.data import LOG_PROB_ALGOS, load_training_pairs

        from .jobs import TrainingJob

        mine = self._job(session)
        if mine is not None and mine.state == "running":  # said before the checks below (again when launched)
            raise UserError("this session's fine-tune is still running: cancel it or wait for it to finish")
        labelled = [s for s in self.store.summaries() if s.label != "tie"]
        if len(labelled) < 2:
            raise UserError(f"training needs at least two labelled pairs (ties do not count); the set has {len(labelled)}")
        if cfg.lora_rank == 0:
            raise UserError("the app trains LoRA adapters (rank >= 1); use the CLI for a full fine-tune")
        cfg = replace(cfg, batch_size=min(cfg.batch_size, len(labelled)))
        if cfg.algo in LOG_PROB_ALGOS:  # e.g. pairs sampled with eta = 0: said here, not by a failed child process
            try:
                load_training_pairs(self.store.root, cfg.algo)
            except ValueError as e:
                raise UserError(str(e)) from None
        session, out = self._run_folder(session, cfg.algo)
        self._launch(session, TrainingJob(self.model_source, self.store.root, cfg, out))
        return session, (f"started {cfg.algo} on {len(labelled)} pairs; the run's folder (log, checkpoints, "
                         f"LoRA weights) is {out}")

    def train_status(self, session: Session) -> tuple[str, list[dict], float]:
        """(message, log rows, fraction done) of the session's fine-tune; the message names its folder."""
        job = self._job(session)
        if job is None:
            return f"no fine-tune started in this session; runs are written under {self.runs_dir.resolve()}", [], 0.0
        rows = job.rows()
        done, frac = job.progress()
        state = job.state
        msg = f"{state}: {done}"
        if rows:
            msg += f" · loss {rows[-1]['loss']:.4f}"
        if state == "failed":
            msg += f" · {job.error()}"
        msg += f" · run folder {job.out}"
        if (job.out / LORA_FILE).is_file() and state != "running":
            msg += " · weights ready: 'Load into the Fuse view' uses them in this session"
        return msg, rows, frac

    def train_cancel(self, session: Session) -> str:
        job = self._job(session)
        if job is None or job.state != "running":
            raise UserError("no fine-tune of this session is running")
        job.cancel()
        return f"cancelled; 'Resume' continues from the last checkpoint in {job.out}"

    def train_resume(self, session: Session) -> str:
        job = self._job(session)
        if job is None:
            raise UserError("no fine-tune of this session to resume")
        self._launch(session, job)
        return f"resumed in {job.out}"

    def _trained(self, session: Session) -> str:
        """The session's run folder that holds trained weights."""
        job = self._job(session)
        if job is None or not (job.out / LORA_FILE).is_file():
            raise UserError("no trained weights yet: start a fine-tune and let it reach a checkpoint")
        return str(job.out)

    def load_trained(self, session: Session) -> tuple[Session, str]:
        """This session's later model calls compute with its fine-tune's LoRA (the latest checkpoint on disk);
        other sessions keep their weights. Candidates sampled with the old weights are dropped."""
        folder = self._trained(session)
        self.model_thread.run(self._adapter, folder)  # loaded (or refreshed) now: a bad file is said here
        session = replace(session, weights=folder, candidates={})
        return session, f"this session now fuses with the LoRA in {folder} (other sessions keep their weights)"

    def unload_trained(self, session: Session) -> tuple[Session, str]:
        """Back to the base weights for this session (its new fusions and labels use them again)."""
        if session.weights is None:
            raise UserError("no fine-tuned weights are loaded in this session")
        return replace(session, weights=None, candidates={}), f"back to the base weights {self.model_source}"

    def before_after(self, session: Session, prompts: list[str], seeds=(0, 1)) -> list[tuple[object, str]]:
        """Held-out prompts with fixed seeds under the base weights (before, always: every adapter off) and the
        session's trained LoRA (after), with scores; the session's own weights are left as they are."""
        folder = self._trained(session)

        def sample_all(weights):
            self._use(weights)
            return {p: sample(self.model, p, list(seeds), self.default_sampling) for p in prompts}

        before = self.model_thread.run(sample_all, None)
        after = self.model_thread.run(sample_all, folder)
        items = []
        for p in prompts:
            for tag, res in (("before", before[p]), ("after", after[p])):
                sc = self.score(res.images, p)
                ok = self.check(res.images, p)
                for i, im in enumerate(res.images):
                    cap = f"{tag} · {p} · seed {seeds[i]}"
                    if sc is not None:
                        cap += f" · {sc[i]:.3f}"
                    if ok is not None:
                        cap += " ✓" if ok[i] else " ✗"
                    items.append((im, cap))
        return items

    # ---- the labelled set (the Dataset tab) -----------------------------------------------------------
    def list_pairs(self, prompt_contains, label) -> list[list]:
        """Rows of PAIR_COLUMNS: pairs whose prompt contains the text, with the label ('any' = all), up to 500."""
        rows = self.store.summaries(prompt_contains or None, None if label == "any" else label, limit=500)
        return [[r.pair_id, r.prompt, r.label, r.base_seed, r.ref_seed, score_cell(r.scores.get("base")),
                 score_cell(r.scores.get("target"))] for r in rows]

    def pair_images(self, pair_id: str) -> tuple[object, object]:
        """(base, target) images of a stored pair."""
        rec = self.store.get(pair_id)
        return rec.images.get("base"), rec.images.get("target")

    def relabel(self, pair_id, label: str) -> str:
        if not pair_id:
            raise UserError("click a row first")
        try:
            self.store.relabel(pair_id, label)
        except KeyError as e:
            raise UserError(str(e)) from None
        return f"pair {pair_id} relabelled '{label}'"

    def delete_pair(self, pair_id, deleted: list) -> str:
        """Delete a pair; it goes on `deleted` (the page's own list, newest last) for `undo_delete`."""
        if not pair_id:
            raise UserError("click a row first")
        try:
            removed = self.store.delete(pair_id)
        except KeyError as e:
            raise UserError(str(e)) from None
        if removed is None:
            return f"pair {pair_id} deleted (its files were unreadable: it cannot be restored)"
        deleted.append(removed)
        del deleted[:-MAX_UNDO_DELETES]
        return f"pair {pair_id} deleted · 'Undo delete' restores it"

    def undo_delete(self, deleted: list) -> str:
        """Restore the last pair deleted from this page, with its label and files."""
        if not deleted:
            raise UserError("nothing deleted to undo on this page")
        removed = deleted.pop()
        try:
            self.store.restore(removed)
        except ValueError as e:
            raise UserError(str(e)) from None
        return f"pair {removed.record.pair_id} restored as '{removed.label}'"

    def export(self) -> tuple[str, str]:
        """(message, path of a .zip): the set as Parquet (caption / jpg_0 / jpg_1 / label_0) plus a pair folder
        (trajectories), for the page to offer as a download. Archives older than an hour are removed."""
        if len(self.store) == 0:
            raise UserError("the set is empty: label a pair in the Fuse tab first")
        EXPORT_DIR.mkdir(parents=True, exist_ok=True)
        for old in EXPORT_DIR.glob("*.zip"):
            try:
                if time.time() - old.stat().st_mtime > 3600:
                    old.unlink()
            except FileNotFoundError:  # another page's export swept it first
                pass
        dest = EXPORT_DIR / f"dfusion-pairs-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.zip"
        try:
            info = self.store.export_archive(dest)
        except OSError as e:
            raise UserError(f"the export could not be written: {e}") from None
        return f"exported {info['pairs']} pairs · {dest.name}", info["out"]

    def import_pairs(self, path) -> str:
        """Pairs from an uploaded .zip / .tar / .tar.gz (an export, or a build-pairs folder packed), added to the
        set; the report says per index file what was imported, skipped (duplicates) and failed, and why."""
        if not path:
            raise UserError("choose a .zip, .tar or .tar.gz to import (an export, or a build-pairs folder packed)")
        name = Path(path).name
        if Path(path).is_dir():
            raise UserError("upload one archive (.zip, .tar or .tar.gz), not a folder")
        try:
            report = self.store.import_pairs(path)
        except ValueError as e:
            raise UserError(str(e).replace(str(path), name)) from None
        report.source = name
        return report.text()

    def undo(self, session: Session) -> str:
        if not session.history:
            raise UserError("nothing to undo in this session")
        pid, previous = session.history.pop()
        try:
            if previous is None:
                self.store.delete(pid)
                return f"removed pair {pid}"
            self.store.relabel(pid, previous)
            return f"pair {pid} back to '{previous}'"
        except KeyError:
            return f"pair {pid} was already removed"
