"""Scorers: `(images, prompts) -> scores`, one float per image (docs/METHOD.md step 2).

The paper scored with OpenCLIP ViT-H-14 / laion2b_s32b_b79k (raw cosine of normalised embeddings). The
OpenCLIP scorer loads a model by name + pretrained tag, by name + local checkpoint file, or an open_clip
folder (`open_clip_config.json` + weights, the format of hub OpenCLIP models) - ShapesWorld's CLIP ships
as such a folder and goes through the same code path. Scorers are made from a spec string by make_scorer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..engine import offline  # noqa: F401
from ..engine.loading import ASSETS, to_pil

DEFAULT_SCORER = ASSETS / "shapesworld-clip"


class Scorer(Protocol):
    name: str

    def __call__(self, images: list, prompts: list[str]) -> np.ndarray: ...


class OpenCLIPScorer:
    """Cosine similarity between OpenCLIP image and text embeddings, batched."""

    def __init__(self, model: str | Path = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k",
                 device: str | None = None, batch_size: int = 64):
        import open_clip

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(batch_size)
        path = Path(str(model)).expanduser()
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise ValueError(f"{path} has no open_clip_config.json: not an OpenCLIP model folder")
            name, pretrained = f"local-dir:{path}", None
        elif str(model).startswith(("local-dir:", "hf-hub:")):
            name = str(model)
        else:
            name = str(model)
            if name not in open_clip.list_models():
                raise ValueError(f"unknown OpenCLIP model {name!r} (and no such folder)")
            if pretrained and not Path(pretrained).is_file() and pretrained not in \
                    {t for m, t in open_clip.list_pretrained() if m == name}:
                raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {name}")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                                   device=self.device)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"could not load OpenCLIP {name} ({pretrained}): {str(e).splitlines()[0]} "
                             "(no network here: pass a local checkpoint file or folder)") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.name = f"openclip:{model}" + (f":{pretrained}" if pretrained else "")

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            ims = torch.stack([self.preprocess(im) for im in to_pil(images[i:i + self.batch_size])]).to(self.device)
            txt = self.tokenizer(prompts[i:i + self.batch_size]).to(self.device)
            a = torch.nn.functional.normalize(self.model.encode_image(ims).float(), dim=-1)
            b = torch.nn.functional.normalize(self.model.encode_text(txt).float(), dim=-1)
            out.append((a * b).sum(-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(prefix: str):
    """Decorator: make_scorer('<prefix>:<arg>') calls the factory with the argument string."""
    def deco(factory):
        _REGISTRY[prefix] = factory
        return factory
    return deco


@register_scorer("openclip")
def _openclip(arg: str, device: str | None = None) -> Scorer:
    """'openclip:NAME:TAG_OR_FILE' or 'openclip:/path/to/folder'."""
    if Path(arg).expanduser().is_dir() or arg.startswith(("local-dir:", "hf-hub:")):
        return OpenCLIPScorer(arg, None, device=device)
    name, _, pretrained = arg.partition(":")
    return OpenCLIPScorer(name, pretrained or None, device=device)


def make_scorer(spec: str | None = None, device: str | None = None) -> Scorer:
    """A scorer from a spec: None = ShapesWorld's CLIP; 'openclip:NAME:TAG_OR_FILE'; an OpenCLIP folder."""
    if spec is None:
        if not DEFAULT_SCORER.is_dir():
            raise ValueError(f"the default scorer {DEFAULT_SCORER} is missing; pass --scorer openclip:NAME:CKPT")
        return OpenCLIPScorer(DEFAULT_SCORER, None, device=device)
    prefix, _, arg = spec.partition(":")
    if prefix not in _REGISTRY:
        if Path(spec).expanduser().is_dir():
            return OpenCLIPScorer(spec, None, device=device)
        raise ValueError(f"unknown scorer {spec!r}; use one of: {', '.join(p + ':...' for p in _REGISTRY)}")
    return _REGISTRY[prefix](arg, device=device)
