"""SD3 / SD3.5: an MMDiT transformer with rectified flow (flow.py: Flow-GRPO's SDE or DDIM-for-flow) and the
joint attention processor (joint_attention.py); prompts read by two CLIPs and, when loaded, T5."""
from __future__ import annotations

import math

import torch

from ..flow import flow_noised, flow_step, make_flow_schedule
from ..joint_attention import install_joint
from ..tokens import keyword_positions, keyword_token_indices
from .base import Conditioning, ModelFamily


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

    def encode(self, model, prompts, negative_prompt, cfg, height, width):
        pe, npe, ppe, nppe = model.pipe.encode_prompt(
            prompts, None, None, device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=[negative_prompt] * len(prompts), max_sequence_length=self.sequence_length(model))
        return Conditioning(pe, npe if cfg else None, {"pooled_projections": ppe},
                            {"pooled_projections": nppe} if cfg else None)

    def sequence_length(self, model):
        """Text tokens after CLIP's 77, T5's or, without T5, the zero rows stock diffusers puts in their place
        (the context embedder's bias makes them non-zero, so they change the image): 256 as in
        StableDiffusion3Pipeline, unless the folder's dfusion.json sets max_sequence_length (the ShapesWorld
        models were trained with 0, i.e. CLIP's tokens alone; stock diffusers draws them with
        max_sequence_length=0)."""
        return int(model.defaults.get("max_sequence_length", 256))

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
