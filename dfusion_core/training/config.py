"""The training runs' parameters: offline (TrainConfig) and on-policy rounds (OnPolicyConfig). Apart from the
trainers so that reading, checking or turning them into command-line flags loads no torch (the CLI builds every
command's flags at start)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..engine.schema import setting, shown

ALGOS = ("dpo", "traj-dpo", "ddpo", "dpok", "sft")
WEIGHTINGS = ("uniform", "logit_normal")


@dataclass
class TrainConfig:
    """Defaults are the paper's reference training setup (docs/METHOD.md)."""

    algo: str = setting("dpo", "dpo (Diffusion-DPO) | traj-dpo (per-step DPO) | ddpo (PPO-clip) | dpok (PG + KL) | "
                               "sft (denoising loss on the winners only: a baseline / positive control)")
    steps: int = setting(100, "optimizer steps")
    batch_size: int = setting(4, "global pairs (dpo, traj-dpo) or trajectories (ddpo, dpok) per step, over all "
                                 "processes")
    lr: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    warmup_steps: int = setting(0, "linear learning-rate warm-up")
    max_grad_norm: float = setting(1.0, "gradient clipping")
    lora_rank: int = setting(4, "LoRA rank on the denoiser's attention; 0 = full fine-tune")
    lora_alpha: float | None = setting(None, "LoRA scaling numerator; None = the rank (scale 1)")
    lora_targets: tuple[str, ...] | None = setting(None, "attention projections adapted; None = the model family's")
    # how a Diffusion-DPO step draws its noise level: uniform over the training schedule (Diffusion-DPO, and
    # diffusers' SD3 script with --weighting_scheme none) or logit_normal (u = sigmoid(N(0, 1)), the density SD3
    # and ShapesWorld's flow models were pre-trained with; the default of diffusers' SD3 training script)
    weighting: str = setting("uniform", "uniform | logit_normal: the training noise levels of dpo")
    dpo_beta: float = setting(5000.0, "Diffusion-DPO beta in the beta/2 convention (= 2500 without the 1/2; see "
                                      "losses)")
    # a D-Fusion pair differs only inside its fusion mask; pairs without a mask (random pairs) weigh everywhere 1
    dpo_outside_weight: float = setting(1.0, "DPO error weight outside the pair's fusion mask (1 = paper, 0 = inside "
                                             "only)")
    traj_beta: float = setting(0.1, "trajectory DPO beta")
    clip_eps: float = setting(0.1, "ratio clip for traj-dpo, ddpo and dpok")
    adv_clip: float = setting(5.0, "DDPO/DPOK advantage clip")
    dual_clip: float = setting(0.0, "DDPO/DPOK dual clip: a negative advantage's loss capped at this x |A| (> 1; 0 = "
                                    "off, as DDPO)")
    # DPOK's KL term is the exact per-step Gaussian KL to the frozen model. Flow-GRPO's (its KL loss) equals that
    # KL times the step's sigma decrement dt, so at the same coefficient this one weighs 1/dt more (3.7x-112x on
    # a 20-step schedule); kl_scale flow_grpo multiplies by dt so a coefficient reads on Flow-GRPO's scale
    kl_coef: float = setting(0.01, "DPOK KL weight")
    kl_scale: str = setting("exact", "exact (per-step Gaussian KL) | flow_grpo (x the step's dt; flow models only)")
    inner_epochs: int = setting(2, "DDPO/DPOK: optimizer steps on each drawn batch")
    # DDPO/DPOK: leave out recorded steps whose mean squared standardised residual under the plain model exceeds
    # this (>= 1; the policy's own draws give ~1, the shipped model's fused targets ~50 at their last step, whose
    # std is 7e-4, so its gradient swamps a batch). 0 = train every step (the paper)
    max_step_residual: float = setting(0.0, "DDPO/DPOK: leave out steps the plain model would not draw (e.g. 2); 0 = "
                                            "none")
    steps_per_trajectory: int = setting(1, "denoising steps sampled per trajectory per optimizer step (all = paper)")
    ckpt_every: int = setting(50, "checkpoint (and LoRA export) every N steps")
    # early stopping (training/early_stopping.py): a share of the pairs is never trained on; at each checkpoint
    # their DPO implicit accuracy (fixed noise draws) is read, the best checkpoint's adapter kept in OUT/best
    # (sets of fewer than 10 pairs are not split: two held-out pairs say nothing)
    val_fraction: float = setting(0.1, "dpo: share of the pairs held out to validate each checkpoint; the best "
                                       "checkpoint is the result (0: none)")
    patience: int = setting(3, "checkpoints without a better validation score before the run stops (0: never)")
    seed: int = setting(0, "batches, timesteps and noise derive from (seed, step)")
    mixed_precision: str = setting("no", "no | fp16 | bf16 (accelerate)")

    def validate(self) -> "TrainConfig":
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {shown(self.algo)}")
        for name in ("steps", "batch_size", "ckpt_every", "inner_epochs", "steps_per_trajectory"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {shown(v)}")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5], got {self.val_fraction}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {shown(self.patience)}")
        if not (0 < self.lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {shown(self.lora_rank)}")
        if self.dpo_beta <= 0 or self.traj_beta <= 0:
            raise ValueError("beta must be positive")
        if not 0.0 <= self.dpo_outside_weight <= 1.0:
            raise ValueError(f"dpo_outside_weight must be in [0, 1], got {self.dpo_outside_weight}")
        if not (0 < self.clip_eps < 1):
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if not (self.dual_clip == 0 or self.dual_clip > 1):
            raise ValueError(f"dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
        if not (self.max_step_residual == 0 or self.max_step_residual >= 1):
            raise ValueError(f"max_step_residual must be 0 (train every step) or >= 1 (a draw of the policy gives "
                             f"about 1), got {self.max_step_residual}")
        if self.kl_scale not in ("exact", "flow_grpo"):
            raise ValueError(f"kl_scale must be exact or flow_grpo, got {shown(self.kl_scale)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {shown(self.weighting)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {shown(self.mixed_precision)}")
        return self


ARMS = ("dfusion", "random")
ON_POLICY_ALGOS = ("ddpo", "dpok")
ADVANTAGE_GROUPS = ("prompt-kind", "prompt")


@dataclass
class OnPolicyConfig(TrainConfig):
    """TrainConfig's fields (steps unused: rounds x inner_epochs x batches decide them) plus the rounds'."""

    algo: str = setting("ddpo", "ddpo (PPO-clip) | dpok (clipped PG + KL to the pre-trained model)")
    rounds: int = setting(10, "sample -> pair -> score -> train rounds")
    arm: str = setting("dfusion", "dfusion (fused targets vs bases) | random (plain samples paired at random)")
    steps_per_trajectory: int = setting(0, "denoising steps trained per trajectory per inner epoch; 0 = all (the "
                                           "papers)")
    micro_batch: int = setting(0, "(trajectory, step) rows per forward pass inside one optimizer step; 0 = all at once")
    sample_batch: int = setting(16, "images per batched sampling / fusion call while collecting a round")
    # rewards are normalised per prompt and kind (plain draws among themselves, fused targets among themselves),
    # or per prompt over all samples ("prompt"). Per prompt, a D-Fusion round's plain draws (its bases) score
    # below its targets and nearly all get negative advantages: trained alone they collapsed the shipped model in
    # two rounds (reward 0.85 -> 0.22), and with the targets they took TEST accuracy from 0.53 to 0.30
    advantage_groups: str = setting("prompt-kind", "prompt-kind (plain draws and fused targets apart) | prompt (all "
                                                   "together)")

    def validate(self) -> "OnPolicyConfig":
        if self.algo not in ON_POLICY_ALGOS:
            raise ValueError(f"on-policy rounds train {' or '.join(ON_POLICY_ALGOS)}, got {shown(self.algo)} "
                             "(dpo and traj-dpo train offline on a pair set: use train --data)")
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {shown(self.arm)}")
        if self.advantage_groups not in ADVANTAGE_GROUPS:
            raise ValueError(f"advantage_groups must be one of {', '.join(ADVANTAGE_GROUPS)}, "
                             f"got {shown(self.advantage_groups)}")
        for name in ("rounds", "sample_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {shown(getattr(self, name))}")
        for name in ("steps_per_trajectory", "micro_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {shown(getattr(self, name))}")
        TrainConfig.validate(replace(self, steps=max(1, self.steps), steps_per_trajectory=1))
        return self
