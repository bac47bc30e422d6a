"""The model-family seam: everything that differs between a UNet + DDIM model and an MMDiT + flow model.

Sampling, fusion, masks, the reference cache and pairs talk to a `ModelFamily` and never to a UNet or a
transformer directly. A family knows its schedule and step (with the step's mean, std and log-prob), one raw
denoiser call, how a prompt is encoded, which attention layers exist and which processor serves them, how
layer presets and mask layers are chosen, its sampling defaults, and for training: how a clean latent is
noised with its regression target (`train_noised`) and which projections LoRA adapts (`lora_targets`).
  * `UNetDDIM`: SD 1.x / 2.x / SDXL (epsilon or v-prediction), stochastic DDIM (ddim.py), attention.py;
  * `MMDiTFlow`: SD3 / SD3.5 (rectified flow), Flow-GRPO's SDE or DDIM-for-flow (flow.py), joint_attention.py.
"""
from __future__ import annotations

import math

import torch

from .attention import install, select_fusion_layers, select_map_layers
from .ddim import ddim_step, make_schedule
from .flow import flow_noised, flow_step, make_flow_schedule
from .joint_attention import install_joint
from .tokens import keyword_positions, keyword_token_indices


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

    def token_groups(self, model, prompt: str, keywords) -> list[tuple[int, ...]]:
        """Each keyword's positions among the text tokens the attention maps are read over."""
        return keyword_token_indices(model.tokenizer, prompt, keywords)

    def all_fusion_layers(self, kinds: dict[str, str]) -> frozenset[str]:
        return frozenset(n for n, k in kinds.items() if k in ("self", "joint"))


class UNetDDIM(ModelFamily):
    name, denoiser_attr = "unet-ddim", "unet"
    defaults = {}

    def schedule(self, scheduler, num_steps):
        return make_schedule(scheduler, num_steps)

    def model_timesteps(self, schedule, steps):
        return torch.tensor([schedule.timesteps[k] for k in steps], dtype=torch.long)

    def step(self, schedule, model_output, x, steps, sampling, noise):
        return ddim_step(schedule, model_output, x, self.model_timesteps(schedule, steps), sampling.eta, noise)

    def forward(self, denoiser, x, t, emb, added):
        kwargs = {"added_cond_kwargs": added} if added else {}
        return denoiser(x, t, encoder_hidden_states=emb, **kwargs).sample

    def train_noised(self, schedule, x0, noise, step_or_t):
        """DDPM noising x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; the target is what the UNet predicts
        (epsilon: the noise; v_prediction: sqrt(a_t) noise - sqrt(1 - a_t) x0; sample: x0)."""
        t = step_or_t.to(x0.device)
        ac = schedule.alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, *([1] * (x0.ndim - 1)))
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        pred = schedule.prediction_type
        target = noise if pred == "epsilon" else (ac.sqrt() * noise - (1 - ac).sqrt() * x0) \
            if pred == "v_prediction" else x0
        return x_t, target, t

    def lora_export(self, peft_state):
        from diffusers.utils import convert_state_dict_to_diffusers

        return {"unet_lora_layers": convert_state_dict_to_diffusers(peft_state)}

    def install(self, denoiser, controller):
        return install(denoiser, controller)

    def map_layers(self, denoiser, kinds, factors):
        return select_map_layers(denoiser, kinds, factors)

    def fusion_layers(self, kinds, layers):
        return select_fusion_layers(kinds, layers)


class MMDiTFlow(ModelFamily):
    """SD3-family transformers. Layer presets by depth, since an MMDiT has no mid block or decoder:
    'all' every block, 'mid+up' the later half (where the paper's UNet layers sit), 'up' the last third,
    'mid' the middle third. Every joint block reads maps; its defaults: Flow-GRPO's noise level 0.7."""

    name, denoiser_attr = "mmdit-flow", "transformer"
    defaults = {"eta": 0.7}
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def schedule(self, scheduler, num_steps):
        return make_flow_schedule(scheduler, num_steps)

    def model_timesteps(self, schedule, steps):
        return torch.tensor([schedule.timesteps[k] for k in steps], dtype=torch.float32)

    def step(self, schedule, model_output, x, steps, sampling, noise):
        return flow_step(schedule, model_output, x, torch.tensor(steps), sampling.eta, noise,
                         sampling.flow_sampler)

    def forward(self, denoiser, x, t, emb, added):
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=emb,
                        pooled_projections=added["pooled_projections"]).sample

    def train_noised(self, schedule, x0, noise, step_or_t):
        """Rectified flow: x_sigma = (1 - sigma) x0 + sigma noise, target the velocity noise - x0. sigma is the
        scheduler's training sigma at index `step_or_t` (with its shift). The trainer draws the index uniformly
        (diffusers' SD3 script with --weighting_scheme none) or logit-normally (that script's default,
        logit_normal; TrainConfig.weighting). The transformer is given sigma * num_train_timesteps, as when
        sampling."""
        sigma = schedule.train_sigmas[step_or_t.long().cpu()]
        x_t, target = flow_noised(x0, noise, sigma)
        return x_t, target, (sigma * schedule.num_train_timesteps).to(x0.device, torch.float32)

    def lora_export(self, peft_state):
        """peft key names, as diffusers' SD3 training script saves them (converting renames to_q's keys to the
        old lora.down form but not add_q_proj's, and the SD3 loader then drops the renamed ones)."""
        return {"transformer_lora_layers": peft_state}

    def install(self, denoiser, controller):
        return install_joint(denoiser, controller)

    def token_groups(self, model, prompt, keywords):
        """CLIP positions (0..76, both CLIP encoders share them) united with T5's (77 + i) when T5 is loaded:
        CLIP and T5 split words differently, a keyword owns what it maps to in each."""
        if model.t5_length == 0:
            return keyword_token_indices(model.tokenizer, prompt, keywords)
        # past CLIP's 77 tokens a keyword may still be within T5's: refused only when neither encoder reads it
        groups = keyword_token_indices(model.tokenizer, prompt, keywords, beyond_limit_ok=True)
        clip_len = model.tokenizer.model_max_length
        t5 = keyword_positions(model.pipe.tokenizer_3, prompt, keywords, offset=clip_len, limit=model.t5_length)
        for kw, c, t in zip(keywords, groups, t5):
            if not c and not t:
                raise ValueError(f"keyword {kw!r} lies beyond both text encoders' limits (CLIP {clip_len} tokens, "
                                 f"T5 {model.t5_length})")
        return [tuple(sorted(set(c) | set(t))) for c, t in zip(groups, t5)]

    def map_layers(self, denoiser, kinds, factors):
        joint = frozenset(n for n, k in kinds.items() if k == "joint")
        if not joint:
            raise ValueError("this transformer has no joint attention block to read masks from")
        return joint, (int(denoiser.config.patch_size),)

    def fusion_layers(self, kinds, layers):
        names = sorted((n for n, k in kinds.items() if k in ("self", "joint")), key=_block_index)
        depth = 1 + max(_block_index(n) for n in names)
        if isinstance(layers, str):
            ranges = {"all": (0, depth), "mid+up": (depth // 2, depth), "up": (depth - math.ceil(depth / 3), depth),
                      "mid": (depth // 3, depth - depth // 3)}
            if layers not in ranges:
                raise ValueError(f"layer preset {layers!r} unknown for an MMDiT; use {', '.join(ranges)} or block paths")
            lo, hi = ranges[layers]
            chosen = frozenset(n for n in names if lo <= _block_index(n) < hi)
        else:
            chosen = frozenset(n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in layers))
        if not chosen:
            raise ValueError(f"no attention block matches {layers!r}; available: {', '.join(names[:4])} ...")
        return chosen


def _block_index(name: str) -> int:
    return int(name.split(".")[1])


FAMILIES = {"sd": UNetDDIM(), "sdxl": UNetDDIM(), "sd3": MMDiTFlow()}
