"""The D-Fusion vs random comparison: the smoke run exercises every arm, the report and resumption."""
import json

import numpy as np
import pytest

from dfusion_core.engine.config import SamplingParams
from dfusion_core.shapesworld.experiment import Experiment, ExperimentConfig, paired_difference, report_markdown


def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float32).mean()) for im in images]


def test_paired_difference_by_hand():
    a = [{"family": "spatial", "prompt": p, "seed": s, "correct": c}
         for p, s, c in [("p1", 0, 1), ("p1", 1, 1), ("p2", 0, 0), ("p2", 1, 1)]]
    b = [{**r, "correct": 0} for r in a]
    d = paired_difference(a, b, "spatial")
    assert d["diff"] == 0.75  # three of four samples flip from wrong to right
    assert d["ci95"][0] <= 0.75 <= d["ci95"][1] and d["ci95"][0] >= 0.5  # per-prompt means are 1.0 and 0.5
    assert paired_difference(a, b, "action")["diff"] is None


def test_smoke_experiment_runs_every_arm_and_resumes(sd1, tmp_path):
    cfg = ExperimentConfig.smoke()
    sampling = SamplingParams(num_steps=cfg.num_steps, height=64, width=64, guidance_scale=2.0)
    exp = Experiment(sd1, brightness, cfg, tmp_path, sampling=sampling, log=lambda *_: None)
    summary = exp.run()
    arms = summary["arms"]
    assert list(arms) == ["base", "dpo/random", "dpo/dfusion", "ddpo/random", "ddpo/dfusion", "dpok/random",
                          "dpok/dfusion", "dpo/dfusion-no-mask"]
    sizes = {c["pairs"] for c in summary["pair_sets"].values()}
    assert len(sizes) == 1 and sizes.pop() >= 2  # every arm trains on the same number of pairs
    for name, a in arms.items():
        fam = a["families"]
        assert set(fam) == {"action", "attribute", "spatial", "all"}
        lo, hi = fam["all"]["accuracy_ci95_prompts"]
        assert lo <= fam["all"]["accuracy"] <= hi
        assert (a["final_train_row"] is None) == (name == "base")
    # random pairs are not fused, so they have no mask region
    assert summary["pair_sets"]["random"]["change_inside_mask"] is None
    assert summary["pair_sets"]["dfusion"]["change_whole"] is not None
    assert set(summary["comparisons"]) == {"dpo", "ddpo", "dpok"}
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "triplets.png").stat().st_size > 0
    md = report_markdown(summary, "python -m dfusion_core.shapesworld.experiment --smoke", ".")
    assert "**Headline:**" in md and "| dpo | spatial |" in md
    # a re-run reuses pair sets and finished arms: the same numbers, no retraining
    again = Experiment(sd1, brightness, cfg, tmp_path, sampling=sampling, log=lambda *_: None).run()
    assert json.dumps(again["arms"], sort_keys=True) == json.dumps(arms, sort_keys=True)


@pytest.mark.parametrize("flags,msg", [(["--algos", "sft"], "unknown"), (["--ablations", "nomask"], "unknown ablation"),
                                       (["--extra", "/no/such/file.md"], "no such file")])
def test_bad_flags_are_one_line_errors(flags, msg, capsys):
    from dfusion_core.shapesworld.experiment import main

    with pytest.raises(SystemExit) as e:
        main(["--out", "/tmp/never", *flags])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_dfusion_pairs_use_the_models_fusion_form(sd1, tmp_path, monkeypatch):
    """The D-Fusion arm fuses with the model's form (its dfusion.json), and the ablations can undo its parts."""
    from dfusion_core.shapesworld.experiment import fusion_variants

    monkeypatch.setattr(sd1, "defaults", {**sd1.defaults, "start_step": 1, "hold_outside": True, "union_base": True})
    exp = Experiment(sd1, None, ExperimentConfig.smoke(), tmp_path)
    assert (exp.fusion.start_step, exp.fusion.hold_outside, exp.fusion.mask.union_base) == (1, True, True)
    v = fusion_variants(exp.fusion, 4, ("reference-only", "no-hold"))
    assert not v["dfusion-reference-only"].mask.union_base and v["dfusion-reference-only"].hold_outside
    assert not v["dfusion-no-hold"].hold_outside and v["dfusion-no-hold"].mask.union_base
