"""The model-family seam: everything that differs between a UNet + DDIM model and an MMDiT + flow model.

Sampling, fusion, masks, the reference cache and pairs talk to a `ModelFamily` and never to a UNet or a
transformer directly. A family knows its schedule and step (with the step's mean, std and log-prob), one raw
denoiser call, how a prompt is encoded, which attention layers exist and which processor serves them, how
layer presets and mask layers are chosen, and its sampling defaults.
  * `UNetDDIM`: SD 1.x / 2.x / SDXL (epsilon or v-prediction), stochastic DDIM (ddim.py), attention.py;
  * `MMDiTFlow`: SD3 / SD3.5 (rectified flow), Flow-GRPO's SDE or DDIM-for-flow (flow.py), joint_attention.py.
"""
from __future__ import annotations

import math

import torch

from .attention import install, select_fusion_layers, select_map_layers
from .ddim import ddim_step, make_schedule
from .flow import flow_step, make_flow_schedule
from .joint_attention import install_joint


class ModelFamily:
    """Interface; one instance per family, stateless."""

    name = ""
    denoiser_attr = ""  # the pipeline attribute holding the denoiser
    defaults: dict = {}  # sampling / mask defaults of the family, under a model folder's dfusion.json

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

    def install(self, denoiser, controller) -> dict[str, str]:
        raise NotImplementedError

    def map_layers(self, denoiser, kinds: dict[str, str], factors) -> tuple[frozenset[str], tuple[int, ...]]:
        raise NotImplementedError

    def fusion_layers(self, kinds: dict[str, str], layers) -> frozenset[str]:
        raise NotImplementedError

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

    def schedule(self, scheduler, num_steps):
        return make_flow_schedule(scheduler, num_steps)

    def model_timesteps(self, schedule, steps):
        return torch.tensor([schedule.timesteps[k] for k in steps], dtype=torch.float32)

    def step(self, schedule, model_output, x, steps, sampling, noise):
        return flow_step(schedule, model_output, x, torch.tensor(steps), sampling.eta, noise,
                         getattr(sampling, "flow_sampler", "sde"))

    def forward(self, denoiser, x, t, emb, added):
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=emb,
                        pooled_projections=added["pooled_projections"]).sample

    def install(self, denoiser, controller):
        return install_joint(denoiser, controller)

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
