"""The Train tab: offline fine-tunes and on-policy rounds as child processes (one per session, a few
app-wide), their progress, loading the result into the session, before / after samples."""
from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dfusion_core.engine.sampling import sample
from dfusion_core.pairs.prompt_sets import load_prompt_set
from dfusion_core.worlds import discover as discover_worlds
from dfusion_core.worlds.registry import world_of

from ..session import (LORA_FILE, MAX_COMPARE_PROMPTS, MAX_ROUND_PROMPTS, MAX_ROUNDS, Session, UserError,
                       check_prompt, model_name)

if TYPE_CHECKING:
    from dfusion_core.training.config import TrainConfig

def validation_text(job) -> str:
    """' · held-out accuracy ...' of a DPO run that validates on held-out pairs ('' for other runs)."""
    if not hasattr(job, "validation"):
        return ""
    vals, ended = job.validation()
    if not vals:
        return ""
    best = max(vals, key=lambda v: v["score"])
    text = (f" · held-out pairs ranked right {vals[-1]['val_implicit_acc']:.2f} (best {best['score']:.2f} at step "
            f"{best['step']})")
    if ended and ended["best_step"] == 0:
        text += (f" · ended at step {ended['last_step']}: no checkpoint ranked the held-out pairs better than the "
                 "untrained model, so the weights are the plain model's")
    elif ended and ended["best_step"] != ended["last_step"]:
        how = "stopped early" if ended["stopped_early"] else "ended"
        text += f" · {how} at step {ended['last_step']}: the weights are step {ended['best_step']}'s, the best"
    return text


class TrainService:
    # ---- training ----------------------------------------------------------------------------------
    def train_config(self, algo: str, lora_rank, lr, beta, steps) -> TrainConfig:
        """The Train tab's values as a checked TrainConfig (beta is dpo_beta or traj_beta, by algorithm)."""
        from dfusion_core.training.config import ALGOS, TrainConfig

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
        from dfusion_core.training.config import ARMS, ON_POLICY_ALGOS, OnPolicyConfig

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

    def on_policy_plan(self, session: Session, cfg, prompts_text: str, num_candidates) -> tuple[list[str], int]:
        """(prompts, candidates per prompt) of the rounds train_on_policy_start would launch; UserError for what it
        refuses, found before anything starts (the page checks it first: a refusal blanks no panel)."""
        self._startable(session)
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
        return prompts, n

    def train_on_policy_start(self, session: Session, cfg, prompts_text: str, num_candidates) -> tuple[Session, str]:
        """DDPO / DPOK rounds on the given prompts in a child process (the CLI's train-on-policy), rewarded by the
        app's scorer: each round samples from the current LoRA, pairs, scores and trains. The session's job."""
        from ..jobs import OnPolicyJob

        prompts, n = self.on_policy_plan(session, cfg, prompts_text, num_candidates)
        session, out = self._run_folder(session, f"{cfg.algo}-rounds")
        self._launch(session, OnPolicyJob(self.model_source, prompts, self.scorer_source, n, cfg, out))
        return session, (f"started {cfg.algo} rounds ({cfg.arm} pairs) on {len(prompts)} prompt(s), {n} candidates "
                         f"each per round; the run's folder (log, rounds, checkpoints, LoRA weights) is {model_name(out)}")

    def _run_folder(self, session: Session, kind: str) -> tuple[Session, Path]:
        """A new run's folder under runs_dir, named by kind, time and the session (which gets a token if new)."""
        token = session.token or uuid.uuid4().hex
        out = (self.runs_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{token[:6]}").resolve()
        return replace(session, token=token), out

    def _job(self, session: Session):
        """The session's latest fine-tune (None before its first): other sessions' jobs are not its to see."""
        return self.jobs.get(session.token) if session.token else None

    def _startable(self, session: Session) -> None:
        """UserError unless a fine-tune may start for the session now: its own is not running and the app runs
        fewer than max_jobs."""
        mine = self._job(session)
        if mine is not None and mine.state == "running":
            raise UserError("this session's fine-tune is still running: cancel it or wait for it to finish")
        running = sum(j.state == "running" for j in self.jobs.values())
        if running >= self.max_jobs:
            raise UserError(f"the app already runs {running} fine-tune{'s' * (running > 1)} for other sessions, "
                            "the most it runs at once: wait for one to finish")

    def _launch(self, session: Session, job) -> None:
        """Start (or restart) a session's job within the app-wide cap on fine-tunes running at once."""
        with self._jobs_lock:
            self._startable(session)  # again under the lock: another session may have started one since the check
            job.start()
            self.jobs[session.token] = job

    def train_plan(self, session: Session, cfg: TrainConfig) -> tuple[TrainConfig, int]:
        """(the config train_start would run, the number of labelled pairs); UserError for what it refuses, found
        before anything starts (the page checks it first: a refusal blanks no panel)."""
        from dfusion_core.training.data import LOG_PROB_ALGOS, load_training_pairs

        self._startable(session)
        labelled = [s for s in self.store.summaries() if s.label != "tie"]
        if len(labelled) < 2:
            raise UserError(f"training needs at least two labelled pairs (ties do not count); the set has {len(labelled)}")
        if cfg.lora_rank == 0:
            raise UserError("the app trains LoRA adapters (rank >= 1); use the CLI for a full fine-tune")
        if cfg.algo in LOG_PROB_ALGOS:  # e.g. pairs sampled with eta = 0: said here, not by a failed child process
            try:
                load_training_pairs(self.store.root, cfg.algo)
            except ValueError as e:
                raise UserError(str(e)) from None
        return replace(cfg, batch_size=min(cfg.batch_size, len(labelled))), len(labelled)

    def train_start(self, session: Session, cfg: TrainConfig) -> tuple[Session, str]:
        """Fine-tune a LoRA on the labelled pairs in a child process (batches capped at the number of pairs).
        The job belongs to the session: its status, cancel, resume, load and before / after act on it alone."""
        from ..jobs import TrainingJob

        cfg, n = self.train_plan(session, cfg)
        session, out = self._run_folder(session, cfg.algo)
        self._launch(session, TrainingJob(self.model_source, self.store.root, cfg, out))
        return session, (f"started {cfg.algo} on {n} pairs; the run's folder (log, checkpoints, "
                         f"LoRA weights) is {model_name(out)}")

    def train_status(self, session: Session) -> tuple[str, list[dict], float]:
        """(message, log rows, fraction done) of the session's fine-tune; the message names its folder."""
        job = self._job(session)
        if job is None:
            return f"no fine-tune started in this session; runs are written under {model_name(self.runs_dir)}", [], 0.0
        rows = job.rows()
        done, frac = job.progress()
        state = job.state
        msg = f"{state}: {done}"
        if rows:
            msg += f" · loss {rows[-1]['loss']:.4f}"
        msg += validation_text(job)
        if state == "failed":
            msg += f" · {job.error()}"
        msg += f" · run folder {model_name(job.out)}"
        if (job.out / LORA_FILE).is_file() and state != "running":
            msg += " · weights ready: 'Load into the Fuse view' uses them in this session"
        return msg, rows, frac

    def running_job(self, session: Session):
        """The session's running fine-tune (what Cancel stops); UserError if none."""
        job = self._job(session)
        if job is None or job.state != "running":
            raise UserError("no fine-tune of this session is running")
        return job

    def train_cancel(self, session: Session) -> str:
        job = self.running_job(session)
        job.cancel()
        return f"cancelled; 'Resume' continues from the last checkpoint in {model_name(job.out)}"

    def resumable_job(self, session: Session):
        """The session's fine-tune, when Resume may restart it now; UserError otherwise."""
        job = self._job(session)
        if job is None:
            raise UserError("no fine-tune of this session to resume")
        self._startable(session)
        return job

    def train_resume(self, session: Session) -> str:
        job = self.resumable_job(session)
        self._launch(session, job)
        return f"resumed in {model_name(job.out)}"

    def trained_folder(self, session: Session) -> str:
        """The session's run folder that holds trained weights; UserError before there are any."""
        job = self._job(session)
        if job is None or not (job.out / LORA_FILE).is_file():
            raise UserError("no trained weights yet: start a fine-tune and let it reach a checkpoint")
        return str(job.out)

    def load_trained(self, session: Session) -> tuple[Session, str]:
        """This session's later model calls compute with its fine-tune's LoRA (the latest checkpoint on disk);
        other sessions keep their weights. Candidates sampled with the old weights are dropped."""
        folder = self.trained_folder(session)
        self.model_thread.run(self._adapter, folder)  # loaded (or refreshed) now: a bad file is said here
        session = replace(session, weights=folder, candidates={})
        return session, f"this session now fuses with the LoRA in {model_name(folder)} (other sessions keep their weights)"

    @staticmethod
    def loaded_weights(session: Session) -> str:
        """The fine-tuned weights the session computes with; UserError when it uses the base weights."""
        if session.weights is None:
            raise UserError("no fine-tuned weights are loaded in this session")
        return session.weights

    def unload_trained(self, session: Session) -> tuple[Session, str]:
        """Back to the base weights for this session (its new fusions and labels use them again)."""
        self.loaded_weights(session)
        return replace(session, weights=None, candidates={}), f"back to the base weights {model_name(self.model_source)}"

    def held_out_prompts(self, session: Session, n: int = 4) -> list[str]:
        """Prompts the session's fine-tune never trained on, from the families of those it did (the model's world's
        TEST lists, spread through each list and round-robin over the families; without a world, the app's
        examples): before / after then shows what the training was meant to improve."""
        discover_worlds()
        job = self._job(session)
        trained = set(getattr(job, "prompts", None) or [r.prompt for r in self.store.summaries(None, None, 100_000)])
        world = world_of(self.model_defaults)
        if world is None:
            return [p for p in self.example_prompts() if p not in trained][:n]
        pools = []
        for fam in world.families:
            train = {e.prompt for e in load_prompt_set(f"{world.name}:{fam}:train")}
            if trained and not trained & train:
                continue  # a family the fine-tune never saw
            pools.append([e.prompt for e in load_prompt_set(f"{world.name}:{fam}:test") if e.prompt not in trained])
        pools = [q for q in pools if q]
        out: list[str] = []
        for k in range(max(map(len, pools), default=0)):
            for q in pools:  # every 7th: a list's neighbours share their first words ("a red and solid ...")
                p = q[(k * 7) % len(q)]
                if len(out) < n and p not in out:
                    out.append(p)
        return out

    def before_after_prompts(self, session: Session, text) -> list[str]:
        """The before / after prompts: the ones typed (one per line), else held_out_prompts."""
        typed = list(dict.fromkeys(check_prompt(p) for p in str(text or "").splitlines() if p.strip()))
        if len(typed) > MAX_COMPARE_PROMPTS:
            raise UserError(f"{len(typed)} prompts; before / after takes at most {MAX_COMPARE_PROMPTS}")
        return typed or self.held_out_prompts(session)

    def before_after_estimate(self, n_prompts: int, seeds=(0, 1)) -> str:
        """What a before / after costs: images, and seconds at this machine's last measured sampling speed."""
        images = n_prompts * len(seeds) * 2
        per = self.seconds_per_image
        took = f", about {max(1, round(images * per))} s at the last sampling's speed" if per else \
            " (how long is known once this app has sampled: Sample in the Fuse tab, or a first before / after)"
        return f"{n_prompts} prompt(s) x {len(seeds)} seeds, base and LoRA: {images} images{took}"

    def before_after(self, session: Session, prompts: list[str], seeds=(0, 1)) -> list[tuple[object, str]]:
        """Held-out prompts with fixed seeds under the base weights (before, always: every adapter off) and the
        session's trained LoRA (after), with scores; the session's own weights are left as they are. One row per
        prompt (before, then after); short captions, so a gallery cell shows them whole."""
        folder = self.trained_folder(session)

        def sample_all(weights):
            self._use(weights)
            return {p: sample(self.model, p, list(seeds), self.default_sampling) for p in prompts}

        t0 = time.perf_counter()
        before = self.model_thread.run(sample_all, None)
        after = self.model_thread.run(sample_all, folder)
        self.seconds_per_image = (time.perf_counter() - t0) / (2 * len(prompts) * len(seeds))  # the next estimate's
        items = []
        for p in prompts:
            for tag, res in (("before", before[p]), ("after", after[p])):
                sc = self.score(res.images, p)
                ok = self.check(res.images, p)
                for i, im in enumerate(res.images):
                    cap = f"{tag} · s{seeds[i]}"
                    if sc is not None:
                        cap += f" · {sc[i]:.2f}"
                    if ok is not None:
                        cap += " ✓" if ok[i] else " ✗"
                    items.append((im, cap))
        return items
