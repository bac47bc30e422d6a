"""The D-Fusion vs random comparison: the smoke run exercises every arm, the report and resumption."""
import json
from dataclasses import replace

import numpy as np
import pytest

from dfusion_core.engine.config import SamplingParams
from dfusion_core.pairs.build import load_pairs
from experiments.shapesworld.experiment import Arm, Experiment, ExperimentConfig, fusion_variants
from experiments.shapesworld.statistics import paired_difference, pooled_summary
from experiments.shapesworld.experiment_report import write_reports


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


@pytest.mark.slow
def test_paired_difference_interval_does_not_depend_on_the_hash_seed():
    """The interval is a bootstrap over prompts by position: the prompts' order must not follow string hashing,
    or the same results give a different interval in every process."""
    import subprocess
    import sys

    code = ("from experiments.shapesworld.statistics import paired_difference as d\n"
            "a = [{'family': 'f', 'prompt': f'prompt {i}', 'seed': s, 'correct': ((i * 37 + s * 11) % 17) / 17} "
            "for i in range(12) for s in range(3)]\n"
            "b = [{**r, 'correct': float(i % 2)} for i, r in enumerate(a)]\n"
            "print(d(a, b, 'all')['ci95'])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2", "3")}
    assert len(outs) == 1, outs


def test_paired_difference_pools_training_seeds_and_pairs_a_single_base():
    rows = lambda vals: [{"family": "spatial", "prompt": f"p{i // 2}", "seed": i % 2, "correct": v}
                         for i, v in enumerate(vals)]
    base = rows([0, 0, 0, 0])
    d = paired_difference([rows([1, 1, 0, 0]), rows([1, 0, 0, 0])], base, "spatial")
    assert d["per_run"] == [0.5, 0.25] and d["diff"] == 0.375  # per sample averaged over the runs, then over samples
    assert d["ci95"][0] <= 0.375 <= d["ci95"][1]
    with pytest.raises(ValueError, match="pair runs"):
        paired_difference([rows([1, 1, 0, 0])] * 2, [base] * 3, "spatial")
    p = pooled_summary([rows([1, 1, 0, 0]), rows([1, 0, 0, 0])], "all")
    assert p["mean"] == 0.375 and p["per_run"] == [0.5, 0.25]


@pytest.mark.slow
def test_smoke_experiment_runs_every_part_and_resumes(sd1, tmp_path):
    cfg = ExperimentConfig.smoke()
    sampling = SamplingParams(num_steps=cfg.num_steps, height=64, width=64, guidance_scale=2.0)
    exp = Experiment(sd1, brightness, cfg, tmp_path, sampling=sampling, log=lambda *_: None)
    calib = exp.run("calibrate")
    assert list(calib["arms"]) == ["base", "dpo/random@lr0.001", "ddpo/random"]  # (SFT: the calibration test's)
    summary = exp.run("headline")
    arms = summary["arms"]
    assert list(arms) == ["base", "dpo/random", "dpo/dfusion", "ddpo/random", "ddpo/dfusion"]  # (DPOK: as DDPO)
    sig = summary["pair_signal"]
    assert sig["random"]["pairs"] == sig["dfusion"]["pairs"] >= 2  # the offline arms train on as many pairs
    assert sig["random"]["masked"] == 0 and sig["dfusion"]["masked"] >= 1  # random pairs have no fusion mask
    for name, a in arms.items():
        for split in ("train", "test"):
            fam = a[split]
            assert set(fam) == {"action", "attribute", "spatial", "all"}
            lo, hi = fam["all"]["correct"]["ci95"]
            assert lo <= fam["all"]["correct"]["mean"] <= hi
            assert ("test_movement" in a) == (name != "base")
    # on-policy arms ran rounds on fresh samples; the D-Fusion arm's include fused targets
    ddpo = [json.loads(p.read_text()) for p in (tmp_path / "arms").glob("ddpo__*.json")]
    assert {r["kind"] for r in ddpo} == {"random", "dfusion"}
    assert all(len(r["train"]["rounds"]) == cfg.rounds for r in ddpo)
    assert [r["train"]["rounds"][0]["fused"] > 0 for r in sorted(ddpo, key=lambda r: r["kind"])] == [True, False]
    assert set(summary["comparisons"]["test"]) == {"dpo", "ddpo"}
    abl = exp.run("ablations")
    assert set(abl["ablations"]) == {"dpo/dfusion-no-mask", "dpo/dfusion-masked-loss", "ddpo/dfusion-no-hold"}
    no_hold = json.loads(exp.arm_path(Arm("ddpo", "dfusion", 0, "no-hold")).read_text())
    assert no_hold["train"]["rounds"][0]["fused"] > 0 and "random" in abl["ablations"]["ddpo/dfusion-no-hold"]["test"]
    masked = json.loads(exp.arm_path(Arm("dpo", "dfusion", 0, "masked-loss")).read_text())
    assert masked["train"]["config"]["dpo_outside_weight"] == 0.0
    assert "dfusion-no-mask" in abl["pair_signal"] and "dfusion-masked-loss" not in abl["pair_signal"]
    path = write_reports(exp, "python -m experiments.shapesworld.experiment --smoke",
                         str(tmp_path / "docs" / "RESULTS-smoke.md"))
    md = (tmp_path / "docs" / "RESULTS-smoke.md").read_text()
    assert "**Headline:**" in md and "| dpo | spatial |" in md and "## Calibration" in md and "## Ablations" in md
    figs = tmp_path / "docs" / "results-smoke"  # the figure folder is named after the report
    assert path.is_file() and (figs / "accuracy.png").stat().st_size > 0 and (figs / "ablations.png").is_file()
    assert (figs / "triplets.png").stat().st_size > 0  # base | reference | target of the D-Fusion pairs
    assert "](results-smoke/ablations.png)" in md
    # a re-run reuses pair sets and finished arms: the same numbers, no retraining
    again = Experiment(sd1, brightness, cfg, tmp_path, sampling=sampling, log=lambda *_: None).run("headline")
    assert json.dumps(again["arms"], sort_keys=True) == json.dumps(arms, sort_keys=True)


def test_on_policy_arms_get_the_budget_with_their_ablation_applied(sd1, tmp_path):
    """What each on-policy arm trains with, without training it: the rounds' budget, a fusion form only for the
    D-Fusion arms, and each RL ablation's one change (fusion held or not, steps kept, advantage groups)."""
    cfg = ExperimentConfig()
    exp = Experiment(sd1, brightness, cfg, tmp_path, log=lambda *_: None)
    oc, fusion = exp.on_policy_config(Arm("ddpo", "random", 1))
    assert fusion is None and (oc.algo, oc.lr, oc.clip_eps, oc.dual_clip, oc.seed) == ("ddpo", cfg.rl_lr, cfg.rl_clip,
                                                                                      cfg.rl_dual_clip, 1)
    assert oc.advantage_groups == "prompt-kind" and oc.max_step_residual == 0.0
    oc, fusion = exp.on_policy_config(Arm("dpok", "dfusion", 0))
    assert fusion == exp.fusion and oc.kl_coef == cfg.rl_kl and oc.kl_scale == cfg.rl_kl_scale
    oc, fusion = exp.on_policy_config(Arm("ddpo", "dfusion", 0, "per-prompt-advantages"))
    assert oc.advantage_groups == "prompt" and fusion == exp.fusion
    oc, fusion = exp.on_policy_config(Arm("ddpo", "dfusion", 0, "drawable-steps"))
    assert oc.max_step_residual == 2.0 and oc.advantage_groups == "prompt-kind"
    oc, fusion = exp.on_policy_config(Arm("ddpo", "dfusion", 0, "no-hold"))
    assert fusion.hold_outside is False and fusion == fusion_variants(exp.fusion, cfg.num_steps, ["no-hold"])[
        "dfusion-no-hold"]


@pytest.mark.parametrize("flags,msg", [(["--algos", "sft"], "unknown"), (["--ablations", "nomask"], "unknown ablation"),
                                       (["--extra", "/no/such/file.md"], "no such file"),
                                       (["--seeds", "0", "0"], "distinct"),
                                       (["--ablation-seeds"], "distinct"), (["--rounds", "0"], ">= 1"),
                                       (["--workers", "0"], "--workers"), (["--part", "all"], "invalid choice"),
                                       (["--rl-ablations", "masked-loss"], "a DPO loss"),
                                       (["--advantage-groups", "kind"], "--advantage-groups"),
                                       (["--max-step-residual", "0.5"], "--max-step-residual")])
def test_bad_flags_are_one_line_errors(flags, msg, capsys):
    from experiments.shapesworld.experiment import main

    with pytest.raises(SystemExit) as e:
        main(["--out", "/tmp/never", *flags])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_dfusion_pairs_use_the_models_fusion_form(sd1, tmp_path, monkeypatch):
    """The D-Fusion arm fuses with the model's form (its dfusion.json), and the ablations can undo its parts."""
    from experiments.shapesworld.experiment import fusion_variants

    monkeypatch.setattr(sd1, "defaults", {**sd1.defaults, "start_step": 1, "hold_outside": True, "union_base": True})
    exp = Experiment(sd1, None, ExperimentConfig.smoke(), tmp_path)
    assert (exp.fusion.start_step, exp.fusion.hold_outside, exp.fusion.mask.union_base) == (1, True, True)
    two = Experiment(sd1, None, replace(ExperimentConfig.smoke(), ablation_seeds=(0, 1)), tmp_path)
    names = [a.name for a in two.arms("ablations")]
    assert {"dpo/dfusion-no-mask/s1", "ddpo/dfusion-no-hold/s1", "dpo/random/s1", "ddpo/dfusion/s0"} <= set(names)
    v = fusion_variants(exp.fusion, 4, ("reference-only", "no-hold"))
    assert not v["dfusion-reference-only"].mask.union_base and v["dfusion-reference-only"].hold_outside
    assert not v["dfusion-no-hold"].hold_outside and v["dfusion-no-hold"].mask.union_base


def test_two_stage_bootstrap_widens_with_the_spread_over_training_seeds_and_holm_adjusts():
    from experiments.shapesworld.statistics import holm, two_stage_bootstrap

    rng = np.random.default_rng(0)
    prompts = lambda shift: [list(shift + rng.normal(0, 0.1, 4)) for _ in range(10)]
    agree = [prompts(0.2), prompts(0.2), prompts(0.2)]  # three training seeds that agree
    spread = [prompts(-0.3), prompts(0.2), prompts(0.7)]  # same mean, seeds far apart
    lo_a, hi_a, p_a = two_stage_bootstrap(agree)
    lo_s, hi_s, p_s = two_stage_bootstrap(spread)
    assert lo_a > 0 and p_a < 0.01 and hi_s - lo_s > 3 * (hi_a - lo_a)
    assert lo_s < 0 < hi_s and p_s > 0.05  # prompts alone (the pooled interval) would have excluded 0
    lo_1, hi_1, _ = two_stage_bootstrap(spread[1:2])  # one run: prompts only
    assert lo_1 > 0
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adj == {"a": 0.03, "b": 0.06, "c": 0.06, "d": None}


@pytest.mark.slow
def test_the_control_arm_trains_on_the_dfusion_pairs_unfused_and_answers_the_primary_endpoint(sd1, tmp_path):
    """The paper's control: DPO on the same (reference, base) pairs as the D-Fusion arm, the reference unfused; the
    summary's primary endpoint is D-Fusion minus control on TEST, and the report states it first."""
    cfg = replace(ExperimentConfig.smoke(), algos=("dpo",), dpo_kinds=("dfusion", "control"), ablations=(),
                  val_prompts=1)
    sampling = SamplingParams(num_steps=cfg.num_steps, height=64, width=64, guidance_scale=2.0)
    exp = Experiment(sd1, brightness, cfg, tmp_path, sampling=sampling, log=lambda *_: None)
    summary = exp.run("headline")
    assert list(summary["arms"]) == ["base", "dpo/dfusion", "dpo/control"]
    arm = json.loads(exp.arm_path(Arm("dpo", "control", 0)).read_text())
    val = {r["prompt"] for r in arm["reports"]["validation"]["rows"]}
    assert val and not val & set(exp.train_prompts)  # validation prompts are never trained on
    sets = exp.pair_sets(["dfusion", "control"])
    assert [(r.base_seed, r.ref_seed) for r in sets["control"]] == [(r.base_seed, r.ref_seed) for r in sets["dfusion"]]
    assert all(c.masks.sum() == 0 and c.extra["kind"] == "control" for c in sets["control"])
    p = summary["primary"]
    assert p["endpoint"].startswith("TEST prompts, all families") and p["diff"] is not None and 0 <= p["p"] <= 1
    assert set(p["families"]) == {"action", "attribute", "spatial"}
    assert all(f["p_holm"] is None for f in p["families"].values())  # one prompt a family: no family claim
    path = write_reports(exp, "python -m experiments.shapesworld.experiment", str(tmp_path / "RESULTS.md"))
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.splitlines()[2].startswith("**Primary endpoint**") and "## D-Fusion minus the inconsistent control" in md
    assert path.is_file()


@pytest.mark.slow
def test_calibration_picks_the_lr_by_validation_and_arms_stop_early(sd1, tmp_path):
    """--part calibrate trains the positive control at each lr, validated at every checkpoint; budget.json keeps the
    lr with the best validation accuracy, and the headline's DPO arms train at it and report their best step."""
    cfg = replace(ExperimentConfig.smoke(), algos=("dpo",), dpo_kinds=("random",), ablations=(), val_prompts=1,
                  dpo_lrs=(1e-3, 3e-3), sft_lrs=(1e-3,), dpo_steps=3, dpo_epochs=100.0, val_every=1, val_seeds=1, patience=1)
    sampling = SamplingParams(num_steps=cfg.num_steps, height=64, width=64, guidance_scale=2.0)
    exp = Experiment(sd1, brightness, cfg, tmp_path, sampling=sampling, log=lambda *_: None)
    assert exp.dpo_lr() == cfg.dpo_lr  # nothing calibrated yet
    calib = exp.run("calibrate")
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["random"]  # no D-Fusion set built for it
    write_reports(exp, None)
    assert "triplets.png" not in (tmp_path / "RESULTS.md").read_text()  # no D-Fusion pairs: no triplet figure
    budget = json.loads((tmp_path / "budget.json").read_text())
    tried = {(t["algo"], t["lr"]): t for t in budget["tried"]}
    assert set(tried) == {("dpo", 1e-3), ("dpo", 3e-3), ("sft", 1e-3)}  # the lr is chosen among the DPO arms
    assert budget["lr"] == max((1e-3, 3e-3), key=lambda lr: tried["dpo", lr]["validation_accuracy"])
    assert budget["dpo_control_passes"] == (budget["movement"]["ci95"][0] > 0)
    assert budget["sft_control_passes"] == (tried["sft", 1e-3]["movement"]["ci95"][0] > 0)
    assert budget["positive_control_passes"] == (budget["dpo_control_passes"] or budget["sft_control_passes"])
    sft = json.loads(exp.arm_path(Arm("sft", "random", 0, lr=1e-3)).read_text())
    assert sft["train"]["config"]["algo"] == "sft" and sft["pairs"] == len(load_pairs(tmp_path / "pairs" / "random"))
    assert sft["train"]["config"]["steps"] == cfg.sft_steps != cfg.dpo_steps  # SFT's own budget
    assert set(sft["reports"]) == {"train", "validation"}  # a calibration arm is read on validation, not TEST
    for lr in (1e-3, 3e-3):
        train = json.loads(exp.arm_path(Arm("dpo", "random", 0, lr=lr)).read_text())["train"]
        assert train["config"]["lr"] == lr and train["config"]["ckpt_every"] == 1
        steps = [v["step"] for v in train["validations"]]
        assert steps == list(range(0, train["steps"] + 1)) and train["best_step"] in steps  # 0: the plain model
        assert max(v["score"] for v in train["validations"]) == \
            next(v["score"] for v in train["validations"] if v["step"] == train["best_step"])
    assert calib["budget"]["lr"] == budget["lr"] and exp.dpo_lr() == budget["lr"]
    exp.run("headline")
    arm = json.loads(exp.arm_path(Arm("dpo", "random", 0)).read_text())
    assert arm["train"]["config"]["lr"] == budget["lr"]
    write_reports(exp, "python -m experiments.shapesworld.experiment", str(tmp_path / "RESULTS.md"))
    md = (tmp_path / "RESULTS.md").read_text()
    assert f"lr **{budget['lr']:g}**" in md and "Positive control" in md


def test_label_by_and_dpo_kinds_are_checked(capsys, tmp_path):
    from experiments.shapesworld.experiment import main

    for args, msg in ((["--label-by", "oracle"], "--label-by must be one of scorer, checker"),
                      (["--dpo-kinds", "control"], "control needs dfusion")):
        with pytest.raises(SystemExit):
            main(["--smoke", "--out", str(tmp_path / "never"), *args])
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_revalidate_refuses_an_unfinished_arm_before_sampling(tmp_path, capsys):
    from experiments.shapesworld.revalidate import main

    (tmp_path / "train" / "dpo__random@lr0.001__s0").mkdir(parents=True)  # started, no adapter yet
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--arms", "dpo__random@lr0.001__s0"])
    assert "no adapter (is the arm finished?)" in capsys.readouterr().err
    assert not (tmp_path / "revalidate.json").exists()
