"""The model-family seam: everything that differs between a UNet + DDIM model and an MMDiT + flow model.

Sampling, fusion, masks, the reference cache and pairs talk to a `ModelFamily` and never to a UNet or a
transformer directly. A family knows its schedule and step (with the step's mean, std and log-prob), one raw
denoiser call, how a prompt is encoded, which attention layers exist and which processor serves them, how
layer presets and mask layers are chosen, its sampling defaults, and for training: how a clean latent is
noised with its regression target (`train_noised`) and which projections LoRA adapts (`lora_targets`).
  * `UNetDDIM`: SD 1.x / 2.x / SDXL (epsilon or v-prediction), stochastic DDIM (ddim.py), attention.py (unet.py);
  * `MMDiTFlow`: SD3 / SD3.5 (rectified flow), Flow-GRPO's SDE or DDIM-for-flow (flow.py), joint_attention.py
    (mmdit.py).
"""
from .base import Conditioning, ModelFamily
from .mmdit import MMDiTFlow
from .unet import UNetDDIM

FAMILIES = {"sd": UNetDDIM(), "sdxl": UNetDDIM(), "sd3": MMDiTFlow()}

__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "MMDiTFlow", "UNetDDIM"]
