"""Load any diffusers Stable Diffusion (1.x, 2.x), SDXL or SD3 / SD3.5 pipeline and prepare it for D-Fusion.

Stock diffusers does the loading (`from_pretrained` on a hub id or a folder); this module adds clear errors,
the per-model defaults file (dfusion.json), prompt encoding for both architectures and decoding.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import offline  # noqa: F401  (sets the no-network environment before diffusers is imported)
from .attention import AttentionController
from .config import FusionParams, SamplingParams, looks_like_hub_id, model_defaults, model_settings
from .families import FAMILIES, Conditioning, ModelFamily

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_MODEL = ASSETS / "shapesworld"
SUPPORTED = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
DENOISERS = {"sd": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model that cannot be used: missing folder, corrupt files or an unsupported architecture."""


@dataclass
class LoadedModel:
    """A pipeline with D-Fusion's processors installed (inactive until a fusion run activates them)."""

    pipe: object
    model_id: str
    kind: str  # sd | sdxl | sd3
    device: torch.device
    dtype: torch.dtype
    defaults: dict = field(default_factory=dict)
    controller: AttentionController = field(default_factory=AttentionController)
    layer_kinds: dict[str, str] = field(default_factory=dict)  # layer path -> 'self' | 'cross' | 'joint'
    base_id: str = ""  # the folder / hub id of the base weights (model_id adds any LoRA on top)
    lora_folders: dict[str, str] = field(default_factory=dict)  # loaded LoRA adapter name -> its folder

    def __post_init__(self):
        self.base_id = self.base_id or self.model_id

    @property
    def family(self) -> ModelFamily:
        return FAMILIES[self.kind]

    @property
    def denoiser(self):
        """The UNet or the MMDiT transformer."""
        return getattr(self.pipe, self.family.denoiser_attr)

    @property
    def unet(self):
        return self.denoiser

    def lora_adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded on the denoiser."""
        pipe = self.pipe
        listed = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
        return list(listed.get(self.family.denoiser_attr, []))

    def load_lora(self, folder: str | Path, name: str) -> None:
        """Put a LoRA folder (diffusers format, e.g. the trainer's output) on the denoiser as adapter `name`,
        replacing an adapter of that name, and compute with it (use_lora). Other adapters stay loaded."""
        self.unload_lora(name)
        self.pipe.load_lora_weights(str(folder), adapter_name=name)
        self.lora_folders[name] = str(folder)
        self.use_lora(name)

    def use_lora(self, name: str | None) -> None:
        """Compute with adapter `name` alone, or with the base weights (None: every adapter off, none removed).
        model_id then names the weights that compute: the base id, or `{base_id}+lora:{folder}`. Switching
        sets a flag on each adapted layer (a few ms), so the app switches before every call of a session."""
        den = self.denoiser
        if name is None:
            if self.lora_folders:
                den.disable_lora()
            self.model_id = self.base_id
            return
        if name not in self.lora_folders:
            raise ValueError(f"no LoRA adapter {name!r} is loaded (loaded: {', '.join(self.lora_folders) or 'none'})")
        den.enable_lora()
        den.set_adapters([name])
        self.model_id = f"{self.base_id}+lora:{self.lora_folders[name]}"

    def unload_lora(self, name: str) -> bool:
        """Remove adapter `name` (False if it was not loaded); computing with it returns to the base weights."""
        if name not in self.lora_adapters():
            return False
        if set(self.lora_adapters()) == {name}:
            self.denoiser.enable_lora()  # the last one: leave no layer switched off for a later adapter
        self.pipe.delete_adapters(name)
        folder = self.lora_folders.pop(name, None)
        if folder is not None and self.model_id == f"{self.base_id}+lora:{folder}":
            self.use_lora(None)
        return True

    def default_sampling(self) -> SamplingParams:
        """The paper's sampling settings under this model's family and dfusion.json defaults: what the library,
        the CLI and the app use when not told otherwise."""
        return model_settings(self.defaults)[0]

    def default_fusion(self) -> FusionParams:
        """The paper's fusion (and mask) settings under this model's defaults, as default_sampling."""
        return model_settings(self.defaults)[1]

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        s = self.denoiser.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return int(self.defaults.get("height", s * self.vae_scale_factor)), int(self.defaults.get("width", s * self.vae_scale_factor))

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        dh, dw = self.default_size()
        h, w = height or dh, width or dw
        f = self.vae_scale_factor * self.patch_size  # an MMDiT cuts the latent into patch x patch tokens
        if h % f or w % f:
            why = f" ({self.vae_scale_factor}x autoencoder, patch {self.patch_size})" if self.patch_size > 1 else ""
            raise ValueError(f"height and width must be multiples of {f} for this model{why}, got {h}x{w}")
        return self.denoiser.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor

    @property
    def patch_size(self) -> int:
        """Latent cells per image token side (an MMDiT's patch; 1 for a UNet)."""
        return int(getattr(self.denoiser.config, "patch_size", None) or 1)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str, cfg: bool, height: int, width: int) -> Conditioning:
        return self.family.encode(self, prompts, negative_prompt, cfg, height, width)

    @property
    def sequence_length(self) -> int:
        """Text tokens after CLIP's (SD3: T5's, or the zero rows in their place; see MMDiTFlow.sequence_length)."""
        return self.family.sequence_length(self)

    @property
    def t5_length(self) -> int:
        """SD3: T5 tokens that read the prompt after the 77 CLIP tokens (0 without T5)."""
        return self.sequence_length if getattr(self.pipe, "text_encoder_3", None) is not None else 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        cfg = vae.config
        z = latents.to(self.device)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        upcast = self.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            x = vae.decode(z.to(dtype)).sample
        finally:
            if upcast:
                vae.to(self.dtype)
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of fp32, fp16, bf16, got {dtype!r}")
    return DTYPES[dtype]


def _check_folder(path: Path) -> str:
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder: give a diffusers pipeline folder or a hub id")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} has no model_index.json: it is not a diffusers pipeline folder")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{index} is corrupt: {e}") from None
    return cls


def _is_shared_encoder_report(record) -> bool:
    """A transformers load report whose only finding is an unused `text_projection.weight`: a CLIPTextModel read
    from a CLIPTextModelWithProjection file, as the shipped UNet model reads the text encoder it shares with
    the default SD3-shaped model (identical weights; the projection is the SD3 model's)."""
    msg = record.getMessage()
    if "LOAD REPORT" not in msg:
        return False
    rows = [ln for ln in msg.splitlines() if "|" in ln and not ln.startswith(("Key", "-"))]
    return bool(rows) and all(ln.split("|")[0].strip() == "text_projection.weight" and "UNEXPECTED" in ln
                              for ln in rows)


def _keep_record(record) -> bool:
    return not _is_shared_encoder_report(record)


def _keep_diffusers_record(record) -> bool:
    """The adapters this project trains adapt the denoiser alone: diffusers' note, on every load, that a text
    encoder got no LoRA keys ('No LoRA keys associated to CLIPTextModelWithProjection ...') says nothing wrong."""
    return not record.getMessage().startswith("No LoRA keys associated to")


def quiet_shared_encoder_reports() -> None:
    """Filters on the libraries' own log handlers: the shared-encoder load reports of transformers and the
    denoiser-only LoRA notes of diffusers (every other message stays)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib, keep in ((tlog, _keep_record), (dlog, _keep_diffusers_record)):
        for handler in lib._get_library_root_logger().handlers:
            if keep not in handler.filters:
                handler.addFilter(keep)


def peek_model(model: str | os.PathLike | None = None) -> tuple[str, dict]:
    """(source, defaults) of what load_model(model) would load, without loading a weight (the app shows its page
    while the model loads): a folder is checked as load_model checks it (ModelLoadError when missing or
    unsupported) and its defaults are its family's with its dfusion.json over them. A hub id is not fetched: in the
    local Hugging Face cache its model_index.json names the family (whose defaults load_model applies too);
    not cached, its defaults are unknown ({}) until it loads."""
    target = Path(model).expanduser() if model is not None else DEFAULT_MODEL
    if not (model is None or target.exists() or not looks_like_hub_id(str(model))):
        return str(model), _cached_hub_defaults(str(model))
    cls = _check_folder(target)
    if cls not in SUPPORTED:
        raise ModelLoadError(f"{target} holds a {cls}; supported: {', '.join(SUPPORTED)}")
    return str(target), {**FAMILIES[SUPPORTED[cls]].defaults, **model_defaults(target)}


def _cached_hub_folder(repo_id: str) -> tuple[Path, str] | None:
    """(snapshot folder, pipeline class) of a hub id whose model_index.json is in the local cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(index, str):
        return None
    try:
        return Path(index).parent, json.loads(Path(index).read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _cached_hub_defaults(repo_id: str) -> dict:
    """The family defaults of a cached hub id ({} when it is not cached): what load_model will apply."""
    cached = _cached_hub_folder(repo_id)
    kind = SUPPORTED.get(cached[1]) if cached else None
    return dict(FAMILIES[kind].defaults) if kind else {}


def _hub_absent_components(repo_id: str) -> dict:
    """What a hub id leaves out on purpose (no safety checker; SD3 without T5), read from its cached snapshot;
    not cached, the safety checker only (SD 1.x repositories ship one)."""
    cached = _cached_hub_folder(repo_id)
    if cached is None or cached[1] == "StableDiffusionPipeline":
        return {"safety_checker": None, "requires_safety_checker": False}
    return _absent_components(*cached, need_folders=False)


def load_model(model: str | os.PathLike | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None, lora: str | os.PathLike | None = None) -> LoadedModel:
    """Load a StableDiffusionPipeline / StableDiffusionXLPipeline by folder or hub id (None = the default),
    optionally with a LoRA folder written by `python -m dfusion_core train` (or any diffusers LoRA)."""
    from diffusers import DiffusionPipeline

    quiet_shared_encoder_reports()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu" and dt == torch.float16:
        raise ValueError("fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    target = Path(model).expanduser() if model is not None else DEFAULT_MODEL
    is_local = model is None or target.exists() or not looks_like_hub_id(str(model))
    if is_local:
        cls = _check_folder(target)
        if cls not in SUPPORTED:
            raise ModelLoadError(f"{target} holds a {cls}; supported: {', '.join(SUPPORTED)}")
        source = str(target)
    else:
        source = str(model)
    try:
        extra = _absent_components(target, cls) if is_local else _hub_absent_components(source)
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dt, **extra)
    except (OSError, ValueError, json.JSONDecodeError, KeyError, RuntimeError) as e:
        raise ModelLoadError(_load_failure(source, is_local, e)) from None
    kind = SUPPORTED.get(type(pipe).__name__)
    if kind is None:
        raise ModelLoadError(f"{source} is a {type(pipe).__name__}; supported: {', '.join(SUPPORTED)}")
    denoiser = getattr(pipe, FAMILIES[kind].denoiser_attr)
    if type(denoiser).__name__ != DENOISERS[kind]:
        raise ModelLoadError(f"{source}: unsupported denoiser class {type(denoiser).__name__} "
                             f"(expected {DENOISERS[kind]})")
    if lora is not None:
        lp = Path(lora).expanduser()
        if not lp.is_dir() or not any(lp.glob("*.safetensors")):
            raise ModelLoadError(f"LoRA folder {lp} does not exist or holds no .safetensors weights")
        try:
            pipe.load_lora_weights(str(lp))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"could not load the LoRA in {lp}: {str(e).splitlines()[0]}") from None
        source_note = f"{source}+lora:{lp}"
    else:
        source_note = source
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    defaults = {**FAMILIES[kind].defaults, **model_defaults(source if is_local else None)}
    lm = LoadedModel(pipe=pipe, model_id=source_note, kind=kind, device=dev, dtype=dt, defaults=defaults,
                     base_id=source)
    lm.layer_kinds = lm.family.install(denoiser, lm.controller)
    if lora is not None:  # named, so use_lora can switch it off and on
        lm.lora_folders = {name: str(lp) for name in lm.lora_adapters()}
    return lm


def _load_failure(source: str, is_local: bool, error: Exception) -> str:
    """One line on why `source` did not load; a hub id says whether downloads were off or failed."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if is_local:
        return f"could not load folder {source!r}: {first}"
    from huggingface_hub import constants

    if _cached_hub_folder(source) is not None:  # cached: the files themselves are the problem
        return f"could not load hub id {source!r} from the local Hugging Face cache: {first}"
    why = ("it is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
           else "it is not in the local Hugging Face cache and could not be downloaded (network, name or access)")
    return (f"could not load hub id {source!r}: {why}. Download it to a folder and pass its path, or unset "
            f"HF_HUB_OFFLINE on a machine with a network ({first})")


def _absent_components(folder: Path, cls: str, need_folders: bool = True) -> dict:
    """Components a local folder leaves out on purpose (no safety checker; SD3 without T5), passed as None.
    need_folders=False (a hub snapshot, whose files may still be downloaded): only what model_index.json names null."""
    if cls == "StableDiffusionPipeline":
        return {"safety_checker": None, "requires_safety_checker": False}
    if cls != "StableDiffusion3Pipeline":
        return {}
    index = json.loads((folder / "model_index.json").read_text())
    absent = {}
    for name in ("text_encoder_3", "tokenizer_3"):
        entry = index.get(name)
        if not entry or entry[0] is None or (need_folders and not (folder / name).is_dir()):
            absent[name] = None
    return absent




def to_pil(images) -> list[Image.Image]:
    """Accept PIL images, HxWx3 uint8 arrays or file paths; return RGB PIL images."""
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        elif isinstance(im, np.ndarray):
            out.append(Image.fromarray(im).convert("RGB"))
        else:
            out.append(Image.open(im).convert("RGB"))
    return out
