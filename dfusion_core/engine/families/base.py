"""The interface every model family implements, and the prompt conditioning it hands the denoiser."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import keyword_token_indices


@dataclass
class Conditioning:
    """Prompt embeddings, one row per prompt, ready to be gathered into denoiser batches."""

    cond: torch.Tensor  # [P, L, D]
    uncond: torch.Tensor | None  # [P, L, D] or None without CFG
    added_cond: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds, time_ids; SD3: pooled_projections
    added_uncond: dict[str, torch.Tensor] | None = None


class ModelFamily:
    """Interface; one instance per family, stateless."""

    name = ""
    denoiser_attr = ""  # the pipeline attribute holding the denoiser
    defaults: dict = {}  # sampling / mask defaults of the family, under a model folder's dfusion.json
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections LoRA adapts

    def schedule(self, scheduler, num_steps: int):
        raise NotImplementedError

    def model_timesteps(self, schedule, steps: list[int]) -> torch.Tensor:
        """What the denoiser is given for rows at these 0-based steps."""
        raise NotImplementedError

    def step(self, schedule, model_output, x, steps: list[int], sampling, noise):
        """The sampler step for rows at these steps -> ddim.StepOutput (next latent, mean, std, x0)."""
        raise NotImplementedError

    def forward(self, denoiser, x, t, emb, added: dict | None) -> torch.Tensor:
        """One raw denoiser call on a batch (no guidance)."""
        raise NotImplementedError

    def train_noised(self, schedule, x0: torch.Tensor, noise: torch.Tensor,
                     step_or_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: (noised latent, regression target, denoiser timestep) per row. `step_or_t` is an integer
        in [0, schedule.num_train_timesteps) per row, drawn by the trainer (TrainConfig.weighting) for every family."""
        raise NotImplementedError

    def lora_export(self, peft_state: dict) -> dict:
        """A trained LoRA (peft state dict) as the pipeline's `save_lora_weights` takes it, so that
        `load_lora_weights` / `load_model(..., lora=DIR)` load it back."""
        raise NotImplementedError

    def install(self, denoiser, controller) -> dict[str, str]:
        raise NotImplementedError

    def map_layers(self, denoiser, kinds: dict[str, str], factors) -> tuple[frozenset[str], tuple[int, ...]]:
        raise NotImplementedError

    def fusion_layers(self, kinds: dict[str, str], layers) -> frozenset[str]:
        raise NotImplementedError

    def encode(self, model, prompts: list[str], negative_prompt: str, cfg: bool, height: int,
               width: int) -> Conditioning:
        """The prompts' conditioning (and the negative prompt's under CFG) with the model's own text encoders."""
        raise NotImplementedError

    def sequence_length(self, model) -> int:
        """Text tokens the encoder adds after CLIP's (an SD3's T5 rows); 0 for CLIP-only families."""
        return 0

    def token_groups(self, model, prompt: str, keywords) -> list[tuple[int, ...]]:
        """Each keyword's positions among the text tokens the attention maps are read over."""
        return keyword_token_indices(model.tokenizer, prompt, keywords)

    def all_fusion_layers(self, kinds: dict[str, str]) -> frozenset[str]:
        return frozenset(n for n, k in kinds.items() if k in ("self", "joint"))
