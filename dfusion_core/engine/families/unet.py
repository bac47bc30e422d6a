"""SD 1.x / 2.x / SDXL: a UNet with stochastic DDIM (ddim.py) and the UNet attention processors
(attention.py); SDXL adds pooled text embeddings and size conditioning to each call."""
from __future__ import annotations

import torch

from ..attention import install, select_fusion_layers, select_map_layers
from ..ddim import ddim_step, make_schedule
from .base import Conditioning, ModelFamily


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

    def encode(self, model, prompts, negative_prompt, cfg, height, width):
        pipe, neg = model.pipe, [negative_prompt] * len(prompts)
        if model.kind != "sdxl":
            pe, npe = pipe.encode_prompt(prompts, model.device, 1, cfg, negative_prompt=neg)
            return Conditioning(pe, npe if cfg else None)
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, device=model.device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=cfg, negative_prompt=neg)
        proj = pipe.text_encoder_2.config.projection_dim
        tid = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                     text_encoder_projection_dim=proj).to(model.device).repeat(len(prompts), 1)
        return Conditioning(pe, npe if cfg else None, {"text_embeds": ppe, "time_ids": tid},
                            {"text_embeds": nppe, "time_ids": tid} if cfg else None)

    def install(self, denoiser, controller):
        return install(denoiser, controller)

    def map_layers(self, denoiser, kinds, factors):
        return select_map_layers(denoiser, kinds, factors)

    def fusion_layers(self, kinds, layers):
        return select_fusion_layers(kinds, layers)
