"""The Fuse tab: sampling and scoring candidates, checking the controls, fusing (with the reference
cache), the attention maps and masks shown, labelling a pair into the store."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from dfusion_core.data.preference_store import LABELS
from dfusion_core.engine.config import FUSION_LAYER_PRESETS, FusionParams, SamplingParams
from dfusion_core.engine.fusion import finish_log_probs, fuse
from dfusion_core.engine.progress import FusionCancelled, FusionStep
from dfusion_core.engine.sampling import MAX_SEED, check_pair_seeds, sample
from dfusion_core.engine.schema import SettingError, widget_of
from dfusion_core.engine.tokens import default_keywords, word_tokens
from dfusion_core.pairs.build import record_from_result
from dfusion_core.worlds.registry import explain_prompt, world_of

from ..session import (MAX_CANDIDATES, Candidate, FuseControls, Session, UserError, check_prompt, example_prompts,
                       parse_seed)

PREVIEW_EVERY = 0.5  # seconds at least between two previews of a forming target (each is one decoder pass)
PREVIEW_SHARE = 0.1  # and at most this share of the fusion's time spent decoding them (a loaded machine decodes slowly)
PREVIEW_AFTER = 0.3  # no preview before a fusion has run this long: a quick one (a quiet machine) pays nothing


class FuseService:
    # ---- inputs -> parameters -------------------------------------------------------------------
    def sampling(self, steps, guidance, eta) -> SamplingParams:
        values = {"num_steps": _number(steps, "steps", int, "steps"), "guidance_scale": _number(guidance, "CFG",
                  float, "guidance"), "eta": _number(eta, "eta", float, "eta")}
        try:
            return replace(self.default_sampling, **values).validate()
        except SettingError as e:
            raise UserError(str(e), widget_of(SamplingParams, e.field)) from None

    def fusion(self, num_steps: int, keywords, threshold_mode, threshold, start_step, end_step, layers, resize,
               use_mask, union_base=None, dilate=None, feather=0.0, combine=None, hold_outside=None) -> FusionParams:
        """The Fuse controls' values as checked FusionParams; union_base, dilate and hold_outside left None take
        the model's defaults (its dfusion.json). A refusal names the control it is about (UserError.widget)."""
        d = self.default_fusion
        union_base = d.mask.union_base if union_base is None else union_base
        dilate = d.mask.dilate if dilate is None else dilate
        hold_outside = d.hold_outside if hold_outside is None else hold_outside
        if layers not in FUSION_LAYER_PRESETS:
            raise UserError(f"layers must be one of {', '.join(FUSION_LAYER_PRESETS)}", "layers")
        start = _number(start_step, "the fusion range's first step", int, "start_step")
        end = _number(end_step, "the fusion range's last step", int, "end_step")
        if start > end:
            raise UserError(f"the fusion range starts at step {start}, after its end at step {end}", "end_step")
        if keywords is not None and len(keywords) == 0:
            raise UserError("no keyword selected: tick at least one word for the mask (or turn the mask off)",
                            "keywords")
        try:
            mask = replace(self.default_mask, keywords=tuple(keywords) if keywords else None,
                           threshold_mode=threshold_mode, threshold=_number(threshold, "threshold", float, "threshold"),
                           resize=resize, union_base=bool(union_base), dilate=_number(dilate, "dilate", int, "dilate"),
                           feather=float(feather), combine=combine or self.default_mask.combine)
            return FusionParams(start_step=start, end_step=end, layers=layers, use_mask=bool(use_mask),
                                hold_outside=bool(hold_outside), mask=mask).validate(num_steps)
        except SettingError as e:
            raise UserError(str(e), widget_of(FusionParams, e.field)) from None

    def fuse_settings(self, c: FuseControls) -> tuple[SamplingParams, FusionParams]:
        """The Fuse tab's controls as checked (sampling, fusion) settings."""
        sampling = self.sampling(c.steps, c.guidance, c.eta)
        return sampling, self.fusion(sampling.num_steps, c.keywords, c.threshold_mode, c.threshold, c.start_step,
                                     c.end_step, c.layers, c.resize, c.use_mask, c.union_base, c.dilate,
                                     combine=c.combine, hold_outside=c.hold_outside)

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

    @staticmethod
    def check_candidates(n) -> int:
        n = _number(n, "the number of candidates", int, "n_cand")
        if not 1 <= n <= MAX_CANDIDATES:
            raise UserError(f"the number of candidates must be between 1 and {MAX_CANDIDATES}", "n_cand")
        return n

    def sample_candidates(self, session: Session, prompt, n, first_seed, sampling: SamplingParams) -> Session:
        prompt = check_prompt(prompt)
        n = self.check_candidates(n)
        seed0 = parse_seed(first_seed, "first seed")
        seeds = [(seed0 + i) % (MAX_SEED + 1) for i in range(n)]
        t0 = time.perf_counter()
        res = self._run(session, sample, self.model, prompt, seeds, sampling)
        self.seconds_per_image = (time.perf_counter() - t0) / n  # the before / after estimate's speed
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
             fusion: FusionParams, preview=None) -> Session:
        """Fuse the pair into the session. A newer fusion of the same session started meanwhile stops this one at
        its next step (FusionCancelled). preview(step, num_steps, image): the target's x0 prediction as it forms,
        from PREVIEW_AFTER seconds on, at most every PREVIEW_EVERY seconds and PREVIEW_SHARE of the time (called on the
        model thread)."""
        prompt = check_prompt(prompt)
        b, r = self.pair_seeds(base_seed, ref_seed)
        same = session.prompt == prompt and session.sampling == sampling
        cand = session.candidates.get(b) if same else None
        number = session.fusions.take()
        try:
            res = self._run(session, fuse, self.model, prompt, b, r, sampling, fusion,
                            base=cand.trajectory if cand else None, cache=self.cache,
                            base_image=cand.image if cand else None, previous=session.result,
                            exact_log_probs=False,  # a held target's log-probs: recomputed when it is labelled
                            on_step=self._on_step(session, number, preview))
        except ValueError as e:
            raise UserError(str(e)) from None
        finally:
            session.fusions.finish(number)
        if not same:
            session = replace(session, prompt=prompt, sampling=sampling, candidates={})
        prev = session.result
        unchanged = prev is not None and (prev.prompt, prev.base_seed, prev.ref_seed, prev.sampling) == (prompt, b, r,
                                                                                                     sampling)
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

    def _on_step(self, session: Session, number: int, preview):
        """The engine's on_step for one fusion: stop when superseded, else a preview now and then."""
        due = [time.perf_counter() + PREVIEW_AFTER]

        def on_step(p: FusionStep) -> None:
            if session.fusions.stale(number):
                raise FusionCancelled(f"fusion {number} superseded by fusion {session.fusions.latest}")
            now = time.perf_counter()
            if preview is not None and p.x0_pred is not None and p.step < p.num_steps and now >= due[0]:
                image = self.model.decode(p.x0_pred[None])[0]
                took = time.perf_counter() - now
                preview(p.step, p.num_steps, image)
                due[0] = time.perf_counter() + max(PREVIEW_EVERY, took / PREVIEW_SHARE)
        return on_step

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

    @staticmethod
    def fused_result(session: Session):
        """The session's fused pair; UserError before the first fusion."""
        if session.result is None:
            raise UserError("fuse a pair first")
        return session.result

    def x0_images(self, session: Session) -> list:
        """Decoded x0 predictions of the target, one per step (the trajectory viewer)."""
        self.fused_result(session)
        if session.x0_images is None:
            session.x0_images = self._run(session, self.model.decode, session.result.target.x0_preds)
        return session.x0_images

    @staticmethod
    def check_label(session: Session, label: str) -> None:
        if session.result is None:
            raise UserError("nothing to label yet: fuse a pair first")
        if label not in (*LABELS, "skip"):
            raise UserError(f"unknown label '{label}'")

    def label(self, session: Session, label: str) -> str:
        self.check_label(session, label)
        if label == "skip":
            return "skipped"
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

    @staticmethod
    def check_undo(session: Session) -> None:
        if not session.history:
            raise UserError("nothing to undo in this session")

    def undo(self, session: Session) -> str:
        self.check_undo(session)
        pid, previous = session.history.pop()
        try:
            if previous is None:
                self.store.delete(pid)
                return f"removed pair {pid}"
            self.store.relabel(pid, previous)
            return f"pair {pid} back to '{previous}'"
        except KeyError:
            return f"pair {pid} was already removed"


def _number(value, name: str, kind, widget: str):
    """A widget's number (int: whole numbers only), or a UserError on that widget that shows what was typed."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got '{value}'", widget) from None
    if not f == f or f in (float("inf"), float("-inf")) or (kind is int and f != int(f)):
        raise UserError(f"{name} must be a {'whole ' if kind is int else ''}number, got '{value}'", widget)
    return kind(f)
