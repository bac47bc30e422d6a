"""Parameters of sampling, masking and fusion, with the paper's defaults stated once.

Every field carries its help, CLI flag and app control (engine/schema.py); `validate()` turns bad values into
a SettingError (a ValueError naming the field) so that the CLI and the app show the message, on the control
that set it, instead of a traceback.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .schema import SettingError, check, setting, shown

THRESHOLD_MODES = ("auto", "absolute", "relative", "area")
RESIZE_MODES = ("nearest", "smooth")
COMBINE_MODES = ("mean", "union")
FUSION_LAYER_PRESETS = ("mid+up", "up", "mid", "all")
FLOW_SAMPLERS = ("sde", "ddim", "ode")  # dfusion_core.engine.flow; kept here so config imports no torch


@dataclass(frozen=True)
class SamplingParams:
    """How one image is denoised (paper: DDIM, 20 steps, eta 1.0, CFG 5.0, empty negative prompt)."""

    num_steps: int = setting(20, "denoising steps", flag="--steps", widget="steps", label="Steps")
    eta: float = setting(1.0, "DDIM eta: 0 deterministic, 1 DDPM-like (log-probs need > 0); SD3-family models: the "
                              "SDE's noise level, whose default is 0.7", widget="eta",
                   label="eta (0 = deterministic, 1 = stochastic)")
    guidance_scale: float = setting(5.0, "classifier-free guidance; <= 1 disables the unconditional branch",
                                    flag="--cfg", widget="guidance",
                                    label="Guidance (CFG)")
    negative_prompt: str = setting("", "the unconditional prompt", flag="--negative")
    height: int | None = setting(None, "image height in pixels, a multiple of 8 (None: the model's size)")
    width: int | None = setting(None, "image width in pixels, a multiple of 8 (None: the model's size)")
    flow_sampler: str = setting("sde", "SD3-family models: sde (Flow-GRPO), ddim (DDIM for rectified flow) or ode "
                                       "(deterministic: no log-probs)", choices=FLOW_SAMPLERS)

    def validate(self) -> "SamplingParams":
        check(isinstance(self.num_steps, int) and 1 <= self.num_steps <= 1000,
              f"num_steps must be an integer in 1..1000, got {shown(self.num_steps)}", "num_steps")
        check(0.0 <= float(self.eta) <= 1.0, f"eta must be in [0, 1], got {shown(self.eta)}", "eta")
        check(self.flow_sampler in FLOW_SAMPLERS,
              f"flow_sampler must be one of {', '.join(FLOW_SAMPLERS)}, got {shown(self.flow_sampler)}", "flow_sampler")
        check(0.0 <= float(self.guidance_scale) <= 50.0,
              f"guidance_scale must be in [0, 50], got {shown(self.guidance_scale)}", "guidance_scale")
        for name in ("height", "width"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and 8 <= v <= 4096 and v % 8 == 0),
                  f"{name} must be a multiple of 8 in 8..4096, got {shown(v)}", name)
        return self

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class MaskParams:
    """How the reference's cross-attention becomes the fusion mask (docs/METHOD.md step 4)."""

    keywords: tuple[str, ...] | None = setting(None, "prompt words whose attention makes the mask (None: the "
                                                     "prompt's content words)", widget="keywords",
                                               label="Mask keywords")
    layer_factors: tuple[int, ...] = setting((4,), "read cross-attention at latent/F for each factor F (powers of "
                                                   "two; 4 = 16x16 for 64x64 latents)", flag="--mask-factors")
    threshold_mode: str = setting("auto", "how the map is cut into the mask: auto (Otsu, no tuning), absolute "
                                          "(paper), relative (x max) or area", choices=THRESHOLD_MODES,
                                  widget="threshold_mode", label="Threshold mode")
    threshold: float = setting(0.5, "absolute: attention probability; relative: fraction of the map's max; area: "
                                    "fraction of the image kept; auto ignores it", widget="threshold")
    # One diffuse keyword (a colour word that also attends to the background) made the union cover 71-92% of the
    # image on ShapesWorld's train prompts, i.e. near-global fusion (benchmarks/mask_quality.py), hence mean
    combine: str = setting("mean", "keywords' maps: mean = threshold their mean, union = threshold each and OR "
                                   "them (paper)", choices=COMBINE_MODES, widget="combine",
                           label="Keywords combined by (mean map, or union of one mask each: the paper's)")
    resize: str = setting("smooth", "resizing the mask to each fusion layer: nearest (paper) or smooth (bilinear)",
                          choices=RESIZE_MODES, widget="resize", label="Mask resize")
    dilate: int = setting(0, "grow the mask by this many cells at mask resolution", widget="dilate",
                          label="Grow the mask by (cells)")
    dilate_base: int = setting(0, "with union_base, grow the base's part by this many cells more before the OR: "
                                  "its objects are erased whole while the reference's part is not grown")
    feather: float = setting(0.0, "soften edges: Gaussian sigma in cells of the fusion layer (0 = hard)")
    accumulate_steps: bool = setting(False, "average maps over the steps so far instead of the current step only")
    union_base: bool = setting(False, "the mask covers the base's keyword objects too (reference OR base)",
                               widget="union_base", label="Mask covers the base's objects too (reference ∪ base)")
    map_softmax: str = setting("joint", "MMDiT maps: softmax over the joint image+text sequence, or over the text "
                                        "keys only", choices=("joint", "text"))

    def validate(self) -> "MaskParams":
        check(self.threshold_mode in THRESHOLD_MODES,
              f"threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got {shown(self.threshold_mode)}",
              "threshold_mode")
        t = float(self.threshold)
        if self.threshold_mode == "absolute":
            check(0.0 <= t <= 1.0, f"an absolute threshold is an attention probability in [0, 1], got {t}", "threshold")
        elif self.threshold_mode in ("relative", "area"):
            check(0.0 < t <= 1.0, f"a {self.threshold_mode} threshold must be in (0, 1], got {t}", "threshold")
        check(self.combine in COMBINE_MODES, f"combine must be one of {', '.join(COMBINE_MODES)}, got {shown(self.combine)}",
              "combine")
        check(self.map_softmax in ("joint", "text"), f"map_softmax must be joint or text, got {shown(self.map_softmax)}",
              "map_softmax")
        check(self.resize in RESIZE_MODES, f"resize must be one of {', '.join(RESIZE_MODES)}, got {shown(self.resize)}",
              "resize")
        check(isinstance(self.dilate, int) and 0 <= self.dilate <= 16, f"dilate must be 0..16, got {shown(self.dilate)}",
              "dilate")
        check(isinstance(self.dilate_base, int) and 0 <= self.dilate_base <= 16,
              f"dilate_base must be 0..16, got {shown(self.dilate_base)}", "dilate_base")
        check(0.0 <= float(self.feather) <= 16.0, f"feather must be in [0, 16], got {shown(self.feather)}", "feather")
        check(len(self.layer_factors) > 0 and all(isinstance(f, int) and f >= 1 and (f & (f - 1)) == 0
                                                  for f in self.layer_factors),
              f"layer_factors must be powers of two such as 4 or 4, 8, got "
              f"{', '.join(map(str, self.layer_factors))}", "layer_factors")
        if self.keywords is not None:
            check(len(self.keywords) > 0 and all(isinstance(k, str) and k.strip() for k in self.keywords),
                  "keywords must be a non-empty list of words (or None for the prompt's content words)", "keywords")
        return self


@dataclass(frozen=True)
class FusionParams:
    """Where and when the target's self-attention K/V are replaced by the reference's (docs/METHOD.md step 5)."""

    start_step: int = setting(3, "first fused step, 1-based (paper: the two noisiest steps are left alone)",
                              widget="start_step", label="Fuse from step")
    end_step: int | None = setting(None, "last fused step, 1-based inclusive (None: the last step)", widget="end_step",
                                   label="to step")
    layers: str | tuple[str, ...] = setting("mid+up", "fusion layers: a preset (mid+up = paper, up, mid, all) or "
                                                      "module-path prefixes", widget="layers",
                                              label="Fusion layers", choices=FUSION_LAYER_PRESETS)
    use_mask: bool = setting(True, "False (--no-mask): global fusion, no mask; the ablation that destroys consistency",
                             flag="--no-mask", widget="use_mask", label="Use the mask (off = global fusion)")
    # the target's log-probs are then recomputed under the plain model: the held latent is not the sampler's draw
    hold_outside: bool = setting(False, "after each fused step, set the target's latent outside the mask to the "
                                        "base's (an MMDiT's fusion otherwise leaks there)", widget="hold_outside",
                                 label="Keep the base outside the mask (hold its latents)")
    mask: MaskParams = setting(help="how the mask is made", flag=False, default_factory=MaskParams)

    def step_range(self, num_steps: int) -> tuple[int, int]:
        """(first, last) fused step, 1-based inclusive, checked against the number of steps."""
        end = num_steps if self.end_step is None else self.end_step
        check(isinstance(self.start_step, int), f"start_step must be an integer, got {shown(self.start_step)}",
              "start_step")
        check(isinstance(end, int), f"end_step must be an integer, got {shown(end)}", "end_step")
        check(1 <= self.start_step <= num_steps, f"start_step must be in 1..{num_steps}, got {self.start_step}",
              "start_step")
        check(1 <= end <= num_steps, f"end_step must be in 1..{num_steps}, got {end}", "end_step")
        check(self.start_step <= end, f"start_step ({self.start_step}) is after end_step ({end})", "end_step")
        return self.start_step, end

    def validate(self, num_steps: int) -> "FusionParams":
        self.step_range(num_steps)
        if isinstance(self.layers, str):
            check(self.layers in FUSION_LAYER_PRESETS,
                  f"layers must be one of {', '.join(FUSION_LAYER_PRESETS)} or a list of module paths, "
                  f"got {shown(self.layers)}",
                  "layers")
        else:
            check(len(self.layers) > 0 and all(isinstance(p, str) and p for p in self.layers),
                  "layers must be a non-empty list of module-path prefixes", "layers")
        self.mask.validate()
        return self


def looks_like_hub_id(s: str) -> bool:
    """'owner/name' that is not a relative or absolute path (then load_model asks the hub, not the disk)."""
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def missing_model_folder(model: str | None) -> str | None:
    """The message for a --model that names a folder that does not exist (no torch needed: said at once)."""
    if not model or model.startswith("tiny:"):
        return None
    path = Path(model).expanduser()
    if path.exists() or looks_like_hub_id(model):
        return None
    return f"model folder {path} does not exist"


def model_defaults(model_dir: str | Path | None) -> dict:
    """Per-model defaults shipped as dfusion.json inside a pipeline folder (e.g. a small model's lower CFG)."""
    if model_dir is None:
        return {}
    p = Path(model_dir) / "dfusion.json"
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def apply_model_defaults(defaults: dict, sampling: SamplingParams,
                         mask: MaskParams) -> tuple[SamplingParams, MaskParams]:
    """Overlay a model's dfusion.json on the paper defaults (only fields the file names)."""
    s_names = {f.name for f in fields(SamplingParams)}
    m_names = {f.name for f in fields(MaskParams)}
    s = replace(sampling, **{k: v for k, v in defaults.items() if k in s_names})
    m_changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in defaults.items() if k in m_names}
    return s, replace(mask, **m_changes)


def fusion_defaults(defaults: dict, mask: MaskParams) -> FusionParams:
    """The paper's fusion parameters with a model's dfusion.json overlay (only FusionParams fields it names)."""
    f_names = {f.name for f in fields(FusionParams)} - {"mask"}
    changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in defaults.items() if k in f_names}
    return replace(FusionParams(mask=mask), **changes)


def model_settings(defaults: dict) -> tuple[SamplingParams, FusionParams]:
    """The paper's sampling and fusion settings under a model's defaults (family + dfusion.json): the one rule the
    library (LoadedModel.default_sampling / default_fusion), the CLI and the app open on."""
    sampling, mask = apply_model_defaults(defaults, SamplingParams(), MaskParams())
    return sampling, fusion_defaults(defaults, mask)


def read_config_json(path: str | Path, allowed) -> dict:
    """A --config FILE.json's fields, refused with a clear message when unreadable or naming unknown fields."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SettingError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise SettingError(f"config {path} must hold a JSON object of field: value")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SettingError(f"unknown config fields: {', '.join(unknown)}", unknown[0])
    return data
