"""What the app does, without the UI: validation, one thread for the model, the reference cache, the store.

Every public method takes plain values (as widgets deliver them) or the parameter objects built from them
(`sampling`, `fusion`, `train_config`), validates them and raises UserError with a message meant for the
screen. The UI turns UserError into a toast; nothing here imports gradio. The UI never touches the store or
a tensor: every read of the pairs, the masks and the attention maps goes through a method here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dfusion_core.engine.worlds import world_of
from dfusion_core.worlds import discover as discover_worlds
from dfusion_core.engine.config import FUSION_LAYER_PRESETS, FusionParams, MaskParams, SamplingParams, apply_model_defaults
from dfusion_core.engine.fusion import FusionResult, fuse
from dfusion_core.engine.loading import LoadedModel, load_model
from dfusion_core.engine.pairs import record_from_result
from dfusion_core.data.preference_store import LABELS, PreferenceStore
from dfusion_core.engine.prompt_sets import load_prompt_set
from dfusion_core.engine.reference_cache import ReferenceCache
from dfusion_core.engine.sampling import MAX_SEED, Trajectory, check_pair_seeds, sample, validate_prompt
from dfusion_core.engine.tokens import default_keywords, keyword_token_indices, word_tokens

from .model_thread import ModelThread

if TYPE_CHECKING:
    from dfusion_core.training.trainer import TrainConfig

log = logging.getLogger("dfusion.app")
MAX_CANDIDATES = 32
TUNED_ADAPTER = "dfusion_tuned"  # the fine-tuned LoRA loaded into the Fuse view
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


def check_prompt(prompt) -> str:
    """The engine's prompt rule (validate_prompt), as a UserError; whitespace runs collapsed."""
    try:
        validate_prompt(prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    return " ".join(prompt.split())


class AppService:
    def __init__(self, model: LoadedModel | str | None = None, store_dir: str | Path = "dfusion_data/store",
                 scorer=None, cache_bytes: int = 1 << 30, runs_dir: str | Path | None = None):
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.model_source = self.model.model_id  # the folder the training child loads
        self.runs_dir = Path(runs_dir) if runs_dir else Path(store_dir).expanduser().parent / "runs"
        self.job = None
        self.scorer = scorer
        self.store = PreferenceStore(store_dir)
        self.cache = ReferenceCache(max_bytes=cache_bytes)
        self.model_thread = ModelThread()  # one thread runs every model call, one at a time
        s, m = apply_model_defaults(self.model.defaults, SamplingParams(), MaskParams())
        self.default_sampling, self.default_mask = s, m

    # ---- inputs -> parameters -------------------------------------------------------------------
    def sampling(self, steps, guidance, eta) -> SamplingParams:
        try:
            return replace(self.default_sampling, num_steps=int(steps), guidance_scale=float(guidance),
                           eta=float(eta)).validate()
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None

    def fusion(self, num_steps: int, keywords, threshold_mode, threshold, start_step, end_step, layers, resize,
               use_mask, union_base=False, dilate=0, feather=0.0, combine=None) -> FusionParams:
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
        mask = replace(self.default_mask, keywords=tuple(keywords) if keywords else None, threshold_mode=threshold_mode,
                       threshold=float(threshold), resize=resize, union_base=bool(union_base), dilate=int(dilate),
                       feather=float(feather), combine=combine or self.default_mask.combine)
        try:
            return FusionParams(start_step=start, end_step=end, layers=layers, use_mask=bool(use_mask),
                                mask=mask).validate(num_steps)
        except ValueError as e:
            raise UserError(str(e)) from None

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
        res = self.model_thread.run(sample, self.model, prompt, seeds, sampling)
        scores = self.score(res.images, prompt)
        session = Session(prompt=prompt, sampling=sampling)
        verdicts = self.check(res.images, prompt)
        for i, (s, im, tr) in enumerate(zip(seeds, res.images, res.trajectories)):
            session.candidates[s] = Candidate(s, im, tr, None if scores is None else float(scores[i]),
                                              None if verdicts is None else verdicts[i])
        return session

    @staticmethod
    def suggested_seeds(session: Session) -> tuple[int, int]:
        """(base, reference) to fuse first: the lowest- and highest-scored candidates (else the first and last)."""
        cands = list(session.candidates.values())
        if all(c.score is not None for c in cands):
            best = max(cands, key=lambda c: c.score).seed
            worst = min(cands, key=lambda c: c.score).seed
        else:
            best, worst = cands[-1].seed, cands[0].seed
        if best == worst:
            best = cands[-1].seed
        return worst, best

    def example_prompts(self) -> list[str]:
        return example_prompts(self.model.defaults)

    def check(self, images, prompt: str) -> list[bool] | None:
        """The ground-truth checker's verdicts when the model was trained on a registered world; None elsewhere."""
        world = world_of(self.model.defaults)
        if world is None or world.check is None:
            return None
        return world.check(images, prompt)

    def score(self, images, prompt: str):
        if self.scorer is None:
            return None
        return np.asarray(self.model_thread.run(self.scorer, images, [prompt] * len(images)), dtype=float)

    def _drop_lora(self) -> bool:
        if not self.model.unload_lora(TUNED_ADAPTER):
            return False
        self.cache.clear()  # cached references belong to the old weights
        return True

    def _load_lora(self, folder: Path) -> None:
        self.model.load_lora(folder, TUNED_ADAPTER)
        self.cache.clear()

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
            res = self.model_thread.run(fuse, self.model, prompt, b, r, sampling, fusion,
                                        base=cand.trajectory if cand else None, cache=self.cache,
                                        base_image=cand.image if cand else None, previous=session.result)
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
        return self.model_thread.run(run_ablation, self.model, r.prompt, r.base_seed, r.ref_seed, r.sampling,
                                     r.fusion, cache=self.cache, base=r.base, base_image=r.base_image,
                                     scorer=self.scorer, thresholds=[(f"relative {t}", t) for t in thresholds])

    # ---- views of the fused pair (arrays for the UI's overlays) ----------------------------------------
    def word_map(self, session: Session, word: str) -> np.ndarray:
        """[h, w] attention of the reference on one word (its tokens' mean), as the word picker shows it."""
        r = session.result
        idx = dict(zip(r.keywords, r.token_groups)).get(word)
        if idx is None:
            try:  # e.g. a word past the 77-token limit: said as such, not as an internal error
                idx = keyword_token_indices(self.model.tokenizer, r.prompt, [word])[0]
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
            session.x0_images = self.model_thread.run(self.model.decode, session.result.target.x0_preds)
        return session.x0_images

    def label(self, session: Session, label: str) -> str:
        if session.result is None:
            raise UserError("nothing to label yet: fuse a pair first")
        if label == "skip":
            return "skipped"
        if label not in LABELS:
            raise UserError(f"unknown label {label!r}")
        rec = record_from_result(session.result, self.model.model_id, session.scores)
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

    def train_start(self, cfg: TrainConfig) -> str:
        """Fine-tune a LoRA on the labelled pairs in a child process (batches capped at the number of pairs)."""
        from dfusion_core.training.data import LOG_PROB_ALGOS, load_training_pairs

        from .jobs import TrainingJob

        if self.job is not None and self.job.state == "running":
            raise UserError("a fine-tune is already running: cancel it or wait for it to finish")
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
        out = self.runs_dir / f"{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.job = TrainingJob(self.model_source, self.store.root, cfg, out)
        self.job.start()
        return f"started {cfg.algo} on {len(labelled)} pairs → {out}"

    def train_status(self) -> tuple[str, list[dict], float]:
        """(message, log rows, fraction done)."""
        job = self.job
        if job is None:
            return "no fine-tune started", [], 0.0
        rows = job.rows()
        step = rows[-1]["step"] if rows else 0
        state = job.state
        msg = f"{state}: step {step}/{job.total}"
        if rows:
            msg += f" · loss {rows[-1]['loss']:.4f}"
        if state == "failed":
            msg += f" · {job.error()}"
        return msg, rows, step / max(1, job.total)

    def train_cancel(self) -> str:
        if self.job is None or self.job.state != "running":
            raise UserError("no fine-tune is running")
        self.job.cancel()
        return "cancelled; 'Resume' continues from the last checkpoint"

    def train_resume(self) -> str:
        if self.job is None:
            raise UserError("no fine-tune to resume")
        if self.job.state == "running":
            raise UserError("the fine-tune is still running")
        self.job.start()
        return f"resumed in {self.job.out}"

    def load_trained(self) -> str:
        """Load the finished (or last checkpointed) LoRA into the live model used by the Fuse view."""
        if self.job is None or not (self.job.out / "pytorch_lora_weights.safetensors").is_file():
            raise UserError("no trained weights yet: start a fine-tune and let it reach a checkpoint")
        self.model_thread.run(self._load_lora, self.job.out)
        return f"loaded {self.job.out.name} into the Fuse view"

    def unload_trained(self) -> str:
        """Back to the model the app started with (the Fuse view and new labels use it again)."""
        if not self.model_thread.run(self._drop_lora):
            raise UserError("no fine-tuned weights are loaded")
        return f"back to {self.model_source}"

    def before_after(self, prompts: list[str], seeds=(0, 1)) -> list[tuple[object, str]]:
        """Held-out prompts with fixed seeds, before and after loading the trained LoRA, with scores."""
        if self.job is None or not (self.job.out / "pytorch_lora_weights.safetensors").is_file():
            raise UserError("no trained weights yet")
        items = []
        def sample_all():
            return {p: sample(self.model, p, list(seeds), self.default_sampling) for p in prompts}

        before = self.model_thread.run(sample_all)
        self.load_trained()
        after = self.model_thread.run(sample_all)
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
        return [[r.pair_id, r.prompt, r.label, r.base_seed, r.ref_seed, r.scores.get("base"), r.scores.get("target")]
                for r in rows]

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

    def delete_pair(self, pair_id) -> str:
        if not pair_id:
            raise UserError("click a row first")
        try:
            self.store.delete(pair_id)
        except KeyError as e:
            raise UserError(str(e)) from None
        return f"pair {pair_id} deleted"

    def export(self, folder) -> str:
        """The set as Parquet (caption / jpg_0 / jpg_1 / label_0 + trajectories) in a new folder."""
        try:
            info = self.store.export(folder)
        except OSError as e:
            raise UserError(f"cannot write {folder}: {e}") from None
        return f"exported {info['pairs']} pairs to {info['out']}"

    def import_pairs(self, folder) -> str:
        """Pairs from an export or a build-pairs folder, added to the set."""
        if not folder or not folder.strip():
            raise UserError("type the folder to import")
        return f"imported {self.store.import_pairs(folder.strip())} pairs"

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
