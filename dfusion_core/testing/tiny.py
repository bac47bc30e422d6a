"""Small random-weight pipelines in the exact folder format of real checkpoints.

Used by the tests (SD 1.x-, SD 2.x-, SDXL- and SD3-shaped configs, saved with save_pretrained and loaded
back with from_pretrained) and by the GPU benchmarks (an SD 1.5-shaped UNet at 512 px, an SD3.5-medium-shaped
MMDiT at 1024 px; no download needed).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.tokenizer_build import write_clip_tokenizer

KINDS = ("sd1", "sd2", "sdxl", "sd3", "sd3-t5", "sd15-full", "sd35m-full")


def _text_encoder(hidden: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(latent_channels: int = 4, blocks=(32, 64), **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=blocks, in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=latent_channels,
                         norm_num_groups=32 if min(blocks) >= 32 else min(blocks), **extra)


def build_tiny_pipeline(kind: str, out_dir: str | Path) -> Path:
    """Write a random-weight pipeline folder of the given shape and return its path."""
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    out = Path(out_dir)
    tok_dir = write_clip_tokenizer(out.parent / f".{out.name}-tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 32, 64), norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "sd1":  # int head count, conv projection, epsilon
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **common)
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(32), tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(**sched), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sd2":  # list head config, linear projection, v-prediction
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                                    **common)
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(32), tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(prediction_type="v_prediction", **sched),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":  # two text encoders, added (text, time) conditioning, no attention at full resolution
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=8)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text_encoder(32), text_encoder_2=_text_encoder(32, projection=True, seed=1),
            tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
            scheduler=DDIMScheduler(**sched))
    elif kind in ("sd3", "sd3-t5", "sd35m-full"):
        pipe = _sd3_pipeline(kind, tokenizer, tok_dir)
    else:  # "sd15-full": the real SD 1.5 UNet shape with random weights (benchmarks)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        te = _text_encoder(768)
        pipe = StableDiffusionPipeline(vae=_vae(blocks=(128, 256, 512, 512)), text_encoder=te, tokenizer=tokenizer,
                                       unet=unet, scheduler=DDIMScheduler(**sched), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    if kind == "sd3-t5":  # a short T5 sequence keeps the test model small
        (out / "dfusion.json").write_text(json.dumps({"max_sequence_length": 16}))
    if kind == "sd3":  # CLIP's tokens alone, as the shipped model (stock's 256 zero rows would slow every test 4x)
        (out / "dfusion.json").write_text(json.dumps({"max_sequence_length": 0}))
    if kind in ("sd3", "sd35m-full"):  # diffusers leaves absent components out; SD3 folders name them null
        index = out / "model_index.json"
        data = json.loads(index.read_text())
        data.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
        index.write_text(json.dumps(data, indent=2))
    return out


def _sd3_pipeline(kind: str, tokenizer, tok_dir):
    """SD3-layout pipeline: MMDiT transformer, flow-matching scheduler, two CLIP encoders, no T5 (optional in
    SD3). "sd3" is tiny (patch 2, 2 blocks, one SD3.5-style dual-attention block); "sd35m-full" has the
    SD3.5-medium transformer shape (24 blocks of 24 x 64, dual attention in the first 13) for GPU benchmarks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    if kind in ("sd3", "sd3-t5"):
        tf = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                   caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                                   dual_attention_layers=(0,), qk_norm="rms_norm")
        vae, hidden = _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5305), 32
    else:
        tf = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        vae, hidden = _vae(latent_channels=16, blocks=(128, 256, 512, 512), shift_factor=0.0609,
                           scaling_factor=1.5305), 1024
    t5, t5_tok = _t5(tf.config.joint_attention_dim) if kind == "sd3-t5" else (None, None)
    return StableDiffusion3Pipeline(
        transformer=tf, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_text_encoder(hidden, projection=True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(hidden, projection=True, seed=1), tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir),
        text_encoder_3=t5, tokenizer_3=t5_tok)


def _t5(d_model: int):
    """A one-layer T5 encoder of the transformer's joint width, with a tokenizer trained offline."""
    from transformers import T5Config, T5EncoderModel

    from ..engine.tokenizer_build import build_t5_tokenizer

    words = "a an the red blue green yellow purple black circle square triangle dog cat car above below left " \
            "right of on and striped hollow woolen café naïve décor ice-cream dog's".split()
    corpus = [" ".join(words[i:i + 6]) for i in range(len(words))] * 10
    tok = build_t5_tokenizer(corpus)
    torch.manual_seed(2)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return T5EncoderModel(cfg), tok
