"""One schema for every setting: help, flag and app control live on the dataclass fields, and the CLI, the app's
error placement and docs/SETTINGS.md are generated from them."""
import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from dfusion_core.engine.config import FusionParams, MaskParams, SamplingParams
from dfusion_core.engine.schema import SettingError, flag_of, from_dict, help_of, widget_of

REPO = Path(__file__).resolve().parent.parent
SETTINGS = (SamplingParams, MaskParams, FusionParams)


def test_every_setting_has_help():
    from dfusion_core.pairs.build import PairingParams
    from dfusion_core.training.onpolicy import OnPolicyConfig
    from dfusion_core.training.trainer import TrainConfig

    for cls in (*SETTINGS, PairingParams, TrainConfig, OnPolicyConfig):
        missing = [n for n, h in help_of(cls).items() if not h.strip()]
        assert not missing, f"{cls.__name__}: {missing}"


def test_the_cli_flags_are_the_schemas():
    """Every sampling / fusion field with a flag is an option of `fuse`, with the field's name as its dest."""
    from dfusion_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    fuse = {a.dest: a.option_strings for a in sub.choices["fuse"]._actions}
    for cls in SETTINGS:
        for f in fields(cls):
            if flag_of(f):
                assert fuse.get(f.name) and flag_of(f) in fuse[f.name], (f.name, fuse.get(f.name))


def test_flags_set_the_fields_they_name(sd1):
    from dfusion_core.cli import build_parser
    from dfusion_core.cli.common import params_from_args

    a = build_parser().parse_args(["fuse", "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2",
                                   "--steps", "4", "--cfg", "2", "--no-mask", "--accumulate-steps",
                                   "--map-softmax", "text", "--layers", "up", "--mask-factors", "2", "4",
                                   "--end-step", "3"])
    s, f = params_from_args(a, sd1)
    assert (s.num_steps, s.guidance_scale) == (4, 2.0)
    assert (f.use_mask, f.layers, f.end_step) == (False, "up", 3)
    assert (f.mask.accumulate_steps, f.mask.map_softmax, f.mask.layer_factors) == (True, "text", (2, 4))


@pytest.mark.parametrize("cls, kwargs, args, field", [
    (SamplingParams, {"num_steps": 0}, (), "num_steps"),
    (SamplingParams, {"height": 30}, (), "height"),
    (MaskParams, {"threshold_mode": "absolute", "threshold": 2.0}, (), "threshold"),
    (MaskParams, {"dilate": 99}, (), "dilate"),
    (FusionParams, {"start_step": 9}, (4,), "start_step"),
    (FusionParams, {"start_step": 3, "end_step": 2}, (4,), "end_step"),
    (FusionParams, {"layers": "sideways"}, (4,), "layers"),
])
def test_validation_errors_name_their_field(cls, kwargs, args, field):
    with pytest.raises(SettingError) as e:
        cls(**kwargs).validate(*args)
    assert e.value.field == field and isinstance(e.value, ValueError)


def test_every_app_control_of_a_setting_exists_on_the_fuse_endpoint():
    from app.ui import FUSE_INPUTS

    widgets = {f.metadata["widget"] for cls in SETTINGS for f in fields(cls) if f.metadata.get("widget")}
    assert widgets and widgets <= set(FUSE_INPUTS), widgets - set(FUSE_INPUTS)
    assert widget_of(FusionParams, "threshold") == "threshold"  # found in the nested MaskParams


def test_config_json_names_an_unknown_field():
    with pytest.raises(SettingError, match="unknown config fields: thresold") as e:
        from_dict(MaskParams, {"thresold": 0.3})
    assert e.value.field == "thresold"
    assert from_dict(MaskParams, {"layer_factors": [2]}).layer_factors == (2,)


def test_the_settings_doc_is_current():
    """docs/SETTINGS.md is generated; regenerate with python -m dfusion_core.cli.settings_doc > docs/SETTINGS.md."""
    from dfusion_core.cli.settings_doc import settings_doc

    assert (REPO / "docs" / "SETTINGS.md").read_text() == settings_doc()


def test_an_app_refusal_names_its_control(sd1, tmp_path):
    """The step range's refusal goes on the end step (it was shown over the start slider), a typed non-number says
    what was typed (not Python's 'could not convert string to float')."""
    from app.service import AppService, UserError

    svc = AppService(sd1, store_dir=tmp_path / "store")
    with pytest.raises(UserError) as e:
        svc.fusion(4, None, "auto", 0.5, 3, 2, "mid+up", "smooth", True)
    assert e.value.widget == "end_step"
    with pytest.raises(UserError) as e:
        svc.fusion(4, None, "relative", "abc", 1, 4, "mid+up", "smooth", True)
    assert e.value.widget == "threshold" and "'abc'" in str(e.value) and "convert" not in str(e.value)
    with pytest.raises(UserError) as e:
        svc.fusion(4, None, "absolute", 3.0, 1, 4, "mid+up", "smooth", True)
    assert e.value.widget == "threshold"
    with pytest.raises(UserError) as e:
        svc.sampling(4, 99, 1.0)
    assert e.value.widget == "guidance"


def test_the_apps_setting_controls_are_made_from_the_schema(sd1, tmp_path):
    """Each Fuse control of a setting shows the schema's label and choices under the schema's element id."""
    from app.service import AppService
    from app.ui import build_demo
    from dfusion_core.engine.schema import control_spec

    comps = {c.get("props", {}).get("elem_id"): c["props"]
             for c in build_demo(AppService(sd1, store_dir=tmp_path / "store")).config["components"]}
    made = 0
    for cls in SETTINGS:
        for f in fields(cls):
            if not f.metadata.get("widget") or f.name in ("threshold", "keywords"):
                continue  # the threshold slider's label follows its mode; keywords follow the prompt
            spec = control_spec(cls, f.name)
            props = comps[spec["elem_id"]]
            assert props["label"] == spec["label"], f.name
            if spec["choices"]:
                assert [c[0] for c in props["choices"]] == list(spec["choices"]), f.name
            made += 1
    assert made >= 12


def test_messages_show_values_as_typed_not_as_python_reprs():
    """A refused value reads as the person gave it: numpy's scalars as numbers (repr: np.float64(2.0)), text in
    quotes without escapes."""
    import numpy as np

    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.engine.schema import shown

    with pytest.raises(ValueError) as e:
        SamplingParams(eta=np.float64(2.0)).validate()
    assert str(e.value) == "eta must be in [0, 1], got 2.0"
    assert shown("a red\ndog") == "'a red dog'" and shown("it's") == "'it's'" and shown(np.int64(3)) == "3"
