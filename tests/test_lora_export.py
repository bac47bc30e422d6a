"""An exported LoRA computes what the trainer computed, at the adapter's own scale (lora_alpha / rank), whether it
is loaded by stock diffusers (`load_lora_weights`) or by `load_model(lora=...)`: UNet and MMDiT alike."""
import numpy as np
import pytest
import torch

from dfusion_core.engine.config import SamplingParams
from dfusion_core.pairs.build import PairingParams, build_pairs
from dfusion_core.training.data import pairs_from_records
from dfusion_core.training.trainer import TrainConfig, Trainer


def brightness(images, prompts):
    return np.array([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


def _denoise(model, denoiser) -> torch.Tensor:
    """One raw denoiser call on fixed inputs (the same for every copy of the model)."""
    g = torch.Generator().manual_seed(0)
    c, h, w = model.latent_shape(None, None)
    x = torch.randn((1, c, h, w), generator=g)
    cond = model.encode(["a red dog"], "", False, *model.default_size())
    t = model.family.model_timesteps(model.family.schedule(model.pipe.scheduler, 4), [1])
    with torch.no_grad():
        return model.family.forward(denoiser, x, t, cond.cond, cond.added_cond)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sd3"])
def test_lora_with_alpha_above_rank_reloads_at_its_scale(request, pipelines_dir, tmp_path, kind):
    from diffusers import DiffusionPipeline

    from dfusion_core.engine.loading import _absent_components, _check_folder, load_model

    request.getfixturevalue(kind)  # builds the tiny pipeline folder
    folder = pipelines_dir / kind
    m = load_model(folder, device="cpu")
    sp = SamplingParams(num_steps=4, eta=0.7, guidance_scale=3.0)
    pairs = pairs_from_records(build_pairs(m, ["a red dog", "a blue cat"], brightness, sp,
                                           pairing=PairingParams(num_candidates=4)))
    tr = Trainer(m, pairs, TrainConfig(algo="dpo", steps=2, batch_size=2, lr=5e-2, lora_rank=4, lora_alpha=16),
                 tmp_path / "lora")
    tr.run(progress=False)
    try:
        trained = _denoise(m, m.denoiser)
    finally:
        tr.unload()
    plain = _denoise(m, m.denoiser)
    assert (trained - plain).abs().max() > 1e-3  # the adapter does something

    stock = DiffusionPipeline.from_pretrained(str(folder), **_absent_components(folder, _check_folder(folder)))
    stock.load_lora_weights(str(tmp_path / "lora"))
    denoiser = stock.transformer if kind == "sd3" else stock.unet
    torch.testing.assert_close(_denoise(m, denoiser), trained, atol=1e-5, rtol=1e-4)

    reloaded = load_model(folder, device="cpu", lora=tmp_path / "lora")
    torch.testing.assert_close(_denoise(reloaded, reloaded.denoiser), trained, atol=1e-5, rtol=1e-4)
