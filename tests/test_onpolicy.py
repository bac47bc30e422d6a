"""On-policy DDPO / DPOK rounds (issue 14 item 1) and pair-signal diagnostics (item 2), on tiny pipelines."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dfusion_core import cli
from dfusion_core.data.records import PairRecord, save_pairs
from dfusion_core.data.trajectory import Trajectory
from dfusion_core.engine.config import SamplingParams
from dfusion_core.pairs.build import PairingParams
from dfusion_core.engine.sampling import recompute_log_probs, sampler_stds
from dfusion_core.training import losses
from dfusion_core.training.onpolicy import OnPolicyConfig, OnPolicyTrainer, local_batch, round_samples
from dfusion_core.training.pair_signal import pair_signal

PROMPTS = ["a red dog", "a blue cat"]
SAMPLING = SamplingParams(num_steps=3)
PAIRING = PairingParams(num_candidates=4)  # D-Fusion: 1 reference x 2 bases per prompt -> 2 targets + 2 bases


def step_log_prob_rows(x, mean, stds):
    from dfusion_core.engine.steps import step_log_prob

    return step_log_prob(x, mean, stds.view(-1, 1, 1, 1).expand(-1, 1, 1, 1))


def brightness(images, prompts):
    return np.array([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


def _state(tr):
    return {k: v.clone() for k, v in tr.trainable_state().items()}


# ---- advantages per prompt over all the round's samples ----------------------------------------------
def test_round_samples_and_advantages_by_hand():
    """Two prompts, two D-Fusion pairs each: 4 samples per prompt (2 fused targets, 2 bases), each normalised
    against its own prompt's 4 rewards, not +/-1 per pair."""
    def rec(prompt, base, ref, s_base, s_tgt):
        return SimpleNamespace(prompt=prompt, base_seed=base, ref_seed=ref, extra={}, target=f"T{base}",
                               base=f"B{base}", scores={"base": s_base, "target": s_tgt, "reference": 9.0})
    recs = [rec("p", 1, 9, 1.0, 3.0), rec("p", 2, 9, 2.0, 6.0), rec("q", 5, 8, 0.0, 0.0), rec("q", 6, 8, 4.0, 4.0)]
    prompts, trajs, rewards, fused = round_samples(recs)
    assert prompts == ["p"] * 4 + ["q"] * 4 and trajs == ["T1", "B1", "T2", "B2", "T5", "B5", "T6", "B6"]
    assert fused == [True, False] * 4 and rewards == [3.0, 1.0, 6.0, 2.0, 0.0, 0.0, 4.0, 4.0]
    adv = losses.normalise_rewards(torch.tensor(rewards, dtype=torch.float64), prompts, 5.0)
    sd = 3.5 ** 0.5  # p: rewards 3, 1, 6, 2: mean 3, population variance (0 + 4 + 9 + 1) / 4
    want = [0.0, -2 / sd, 3 / sd, -1 / sd, -1.0, -1.0, 1.0, 1.0]  # q: 0, 0, 4, 4: mean 2, std 2
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float64), atol=1e-7)


def test_random_round_counts_each_candidate_once():
    recs = [SimpleNamespace(prompt="p", base_seed=b, ref_seed=w, extra={"kind": "random"}, target=f"C{w}",
                            base=f"C{b}", scores={"base": float(b), "target": float(w)}) for b, w in ((1, 2), (3, 4))]
    prompts, trajs, rewards, fused = round_samples(recs)
    assert trajs == ["C2", "C1", "C4", "C3"] and rewards == [2.0, 1.0, 4.0, 3.0] and not any(fused)


def test_a_process_passes_over_its_samples_once_then_wraps_around_them():
    """local_batch: 5 samples, 2 per step: 3 steps cover each once (the last short, as in one process); the
    steps another process's larger shard adds start over from the top of the same order, full batches."""
    order = torch.tensor([4, 0, 3, 1, 2])
    got = [local_batch(order, s, 2).tolist() for s in range(6)]
    assert got == [[4, 0], [3, 1], [2], [4, 0], [3, 1], [2, 4]]
    assert sorted(i for b in got[:3] for i in b) == list(range(5))


@pytest.fixture(scope="module")
def two_rounds(sd1, tmp_path_factory):
    """Round 0 collected and trained (lr high enough to move the tiny model), round 1 collected and trained."""
    out = tmp_path_factory.mktemp("onpolicy")
    cfg = OnPolicyConfig(algo="ddpo", rounds=2, batch_size=4, lr=1e-2, inner_epochs=2, max_step_residual=0)
    tr = OnPolicyTrainer(sd1, PROMPTS, brightness, cfg, out, SAMPLING, pairing=PAIRING)
    try:
        res = {"lora0": _state(tr)}
        res["d0"] = tr.collect_round(0)
        assert tr.train_round(res["d0"])
        res["lora1"] = _state(tr)
        res["d1"] = tr.collect_round(1)
        inner = tr.acc.unwrap_model(tr.net)
        with torch.no_grad():
            res["policy_logp"] = torch.stack([recompute_log_probs(sd1, p, t, SAMPLING, denoiser=inner)
                                              for p, t in zip(res["d1"].prompts, res["d1"].trajectories)])
            with tr.reference() as ref:
                res["pretrained_logp"] = torch.stack([recompute_log_probs(sd1, p, t, SAMPLING, denoiser=ref)
                                                      for p, t in zip(res["d1"].prompts, res["d1"].trajectories)])
        assert tr.train_round(res["d1"])
        res["history"] = list(tr.history)
        yield res
    finally:
        tr.unload()


@pytest.mark.slow
def test_a_rounds_advantages_are_normalised_per_prompt_and_kind(two_rounds):
    """Plain draws among themselves, fused targets among themselves (advantage_groups prompt-kind); per prompt
    over all samples they would differ."""
    d = two_rounds["d0"]
    assert sorted(d.prompts) == sorted(PROMPTS * 4) and sum(d.fused) == 4  # 2 targets + 2 bases per prompt
    r = d.rewards.numpy()
    for p in PROMPTS:
        for kind in (True, False):
            idx = [i for i, (q, f) in enumerate(zip(d.prompts, d.fused)) if q == p and f == kind]
            want = (r[idx] - r[idx].mean()) / (r[idx].std() + 1e-8)
            np.testing.assert_allclose(d.advantages[idx].numpy(), want, atol=1e-6)
    per_prompt = losses.normalise_rewards(d.rewards, d.prompts)
    assert (per_prompt - d.advantages).abs().max() > 1e-3


@pytest.mark.slow
def test_per_prompt_advantages_over_all_samples_of_a_round(sd1, tmp_path):
    cfg = OnPolicyConfig(algo="ddpo", rounds=1, batch_size=4, advantage_groups="prompt")
    tr = OnPolicyTrainer(sd1, PROMPTS, brightness, cfg, tmp_path, SAMPLING, pairing=PAIRING)
    try:
        d = tr.collect_round(0)
    finally:
        tr.unload()
    r = d.rewards.numpy()
    for p in PROMPTS:
        idx = [i for i, q in enumerate(d.prompts) if q == p]
        want = (r[idx] - r[idx].mean()) / (r[idx].std() + 1e-8)
        np.testing.assert_allclose(d.advantages[idx].numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="advantage_groups"):
        OnPolicyConfig(advantage_groups="kind").validate()


def test_old_log_probs_of_a_round_are_the_policy_at_its_start(two_rounds):
    d1, hist = two_rounds["d1"], two_rounds["history"]
    # fused targets recomputed under the plain current policy; plain samples keep what they were sampled with
    torch.testing.assert_close(d1.old_log_probs, two_rounds["policy_logp"].float(), atol=1e-4, rtol=0)
    assert (d1.old_log_probs - two_rounds["pretrained_logp"]).abs().max() > 1e-3  # not the pre-trained model's
    first_r1 = next(h for h in hist if h["round"] == 1)
    last_r0 = [h for h in hist if h["round"] == 0][-1]
    assert abs(first_r1["ratio"] - 1) < 1e-4 and first_r1["approx_kl"] < 1e-8 and first_r1["clipfrac"] == 0
    assert abs(last_r0["ratio"] - 1) > 1e-3  # round 0's updates did move the ratios away from 1
    assert all(h["rows"] == 4 * SAMPLING.num_steps for h in hist)  # every step of each trajectory


@pytest.mark.slow
def test_a_held_fusions_targets_keep_the_log_probs_fuse_recomputed(sd1, tmp_path):
    """With the base held outside the mask, fuse already recomputed the targets' log-probs under the policy:
    the round takes them (held_targets) instead of recomputing them again, and they are the policy's."""
    from dfusion_core.engine.config import FusionParams
    from dfusion_core.training.onpolicy import held_targets

    cfg = OnPolicyConfig(algo="ddpo", rounds=1, batch_size=4)
    held = FusionParams(start_step=1, hold_outside=True)
    tr = OnPolicyTrainer(sd1, PROMPTS, brightness, cfg, tmp_path, SAMPLING, fusion=held, pairing=PAIRING)
    try:
        d = tr.collect_round(0)
        inner = tr.acc.unwrap_model(tr.net)
        with torch.no_grad():
            policy = torch.stack([recompute_log_probs(sd1, p, t, SAMPLING, denoiser=inner)
                                  for p, t in zip(d.prompts, d.trajectories)])
    finally:
        tr.unload()
    assert sum(d.fused) == 4
    torch.testing.assert_close(d.old_log_probs, policy.float(), atol=1e-4, rtol=0)
    recs = [SimpleNamespace(prompt="p", base_seed=1, ref_seed=2, extra={}, fusion={"hold_outside": True,
                                                                             "use_mask": True}),
            SimpleNamespace(prompt="p", base_seed=3, ref_seed=2, extra={}, fusion={"hold_outside": False}),
            SimpleNamespace(prompt="p", base_seed=4, ref_seed=5, extra={"kind": "random"}, fusion={})]
    assert held_targets(recs) == {("p", (1, 2))}


@pytest.mark.parametrize("name", ["sd1", "sd3"])
def test_sampler_stds_are_the_steps_own(name, request):
    """The per-step std taken from a step on zeros equals the std of real steps (it never reads the output)."""
    model = request.getfixturevalue(name)
    sampling = SamplingParams(num_steps=4, eta=0.7, flow_sampler="sde")
    fam = model.family
    schedule = fam.schedule(model.pipe.scheduler, sampling.num_steps)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    res = fam.step(schedule, out, x, [0, 1, 2, 3], sampling, None)
    torch.testing.assert_close(sampler_stds(model, sampling), res.std.flatten(1)[:, 0].float())
    assert (sampler_stds(model, sampling)[:-1] > 0).all()


@pytest.mark.slow
def test_steps_the_policy_would_not_draw_are_left_out(sd1, tmp_path):
    """drawable_steps keeps the policy's own draws and drops a step moved 3 stds off its mean; a round keeps every
    step of its plain samples, and an optimizer step trains only its drawable rows (none left: a zero step)."""
    stds = torch.tensor([0.5, 0.1, 7e-4])
    mean = torch.zeros(2, 3, 4, 8, 8)
    g = torch.Generator().manual_seed(1)
    draws = mean + stds.view(1, 3, 1, 1, 1) * torch.randn(mean.shape, generator=g)
    draws[1, 2] += 3 * stds[2]  # the last step of the second trajectory: off the policy
    lp = torch.stack([step_log_prob_rows(draws[i], mean[i], stds) for i in range(2)])
    assert losses.drawable_steps(lp, stds, 2.0).tolist() == [[True, True, True], [True, True, False]]
    assert losses.drawable_steps(lp, stds, 0).all()

    from dfusion_core.engine.config import FusionParams

    cfg = OnPolicyConfig(algo="ddpo", rounds=1, batch_size=4, lr=1e-2, max_step_residual=2.0)
    tr = OnPolicyTrainer(sd1, PROMPTS, brightness, cfg, tmp_path, SAMPLING,
                         fusion=FusionParams(start_step=1, hold_outside=True), pairing=PAIRING)
    try:
        d = tr.collect_round(0)
        plain = [i for i, f in enumerate(d.fused) if not f]
        assert d.drawable[plain].all() and d.info["plain_steps_dropped"] == 0
        want = losses.drawable_steps(d.old_log_probs, sampler_stds(sd1, SAMPLING), 2.0)
        assert torch.equal(d.drawable, want) and d.info["fused_steps_dropped"] == int((~want).sum())
        d.drawable = torch.zeros_like(d.drawable)
        d.drawable[0, 1] = True
        idx, js = torch.tensor([0, 1]), torch.arange(SAMPLING.num_steps).repeat(2, 1)
        assert tr._update(d, idx, js)["rows"] == 1  # only trajectory 0's step 1
        row = tr._update(d, torch.tensor([1]), js[:1])  # nothing drawable: a step of weight 0
    finally:
        tr.unload()
    assert row["rows"] == 1 and row["loss"] == 0.0 and row["grad_norm"] == 0.0


def test_one_on_policy_round_moves_the_lora(two_rounds):
    a, b = two_rounds["lora0"], two_rounds["lora1"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_ddpo_on_policy_on_the_sd3_shaped_pipeline(sd3, tmp_path):
    cfg = OnPolicyConfig(algo="ddpo", rounds=1, batch_size=4, lr=1e-2, inner_epochs=1, micro_batch=5)
    tr = OnPolicyTrainer(sd3, PROMPTS, brightness, cfg, tmp_path, SAMPLING, pairing=PAIRING)
    try:
        before = _state(tr)
        tr.run(progress=False)
        after = _state(tr)
    finally:
        tr.unload()
    assert tr.round == 1 and all(np.isfinite(h["loss"]) for h in tr.history)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 0
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_dpok_rounds_resume_exactly(sd1, tmp_path):
    """Two rounds in one run equal one round, a stop, and a resumed second round (random arm, DPOK)."""
    def run(out, rounds):
        cfg = OnPolicyConfig(algo="dpok", arm="random", rounds=rounds, batch_size=4, lr=1e-2, inner_epochs=1,
                             steps_per_trajectory=2)
        tr = OnPolicyTrainer(sd1, PROMPTS, brightness, cfg, out, SAMPLING, pairing=PAIRING)
        try:
            tr.run(progress=False)
            return _state(tr)
        finally:
            tr.unload()
    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2)
    for k in straight:
        torch.testing.assert_close(straight[k], resumed[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("args,msg", [
    (["--algo", "dpo"], "ddpo or dpok"), (["--rounds", "0"], "rounds"), (["--arm", "both"], "arm"),
    (["--steps-per-trajectory", "-1"], "steps_per_trajectory"), (["--eta", "0"], "eta > 0")])
def test_train_on_policy_bad_input_exits_2_with_one_error_line(capsys, tmp_path, args, msg):
    argv = ["train-on-policy", "--model", "tiny:sd1", "--prompt", "a red dog", "--scorer", "none",
            "--out", str(tmp_path)] + args
    if msg == "eta > 0":  # past the scorer check: refused before the model loads all the same
        argv[argv.index("none")] = "default"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


# ---- pair signal ----------------------------------------------------------------------------------------
def _img(value_by_half):
    """A 4x4 RGB image: left half value_by_half[0], right half value_by_half[1] (grey levels 0..255)."""
    a = np.zeros((4, 4, 3), np.uint8)
    a[:, :2], a[:, 2:] = value_by_half
    return Image.fromarray(a)


def _traj(seed):
    return Trajectory(seed, torch.zeros(3, 4, 1, 1), torch.arange(2), torch.zeros(2), torch.zeros(2, 4, 1, 1))


def _signal_records():
    left = torch.zeros(2, 2, 2)
    left[1, :, 0] = 1.0  # step 2 fuses the left half: union over steps = left half
    recs = [
        # winner (target) correct (bright), loser wrong; differs by 155 inside the mask, 0 outside
        PairRecord("p", 1, 2, {"base": 0.1, "target": 0.4}, {}, {}, [], "m", _traj(1), _traj(1), left,
                   {"target": _img((255, 0)), "base": _img((100, 0))}, "target", "a"),
        # label base: winner = base (correct), loser = target (correct); differ by 102 outside the mask only
        PairRecord("p", 3, 4, {"base": 0.5, "target": 0.3}, {}, {}, [], "m", _traj(3), _traj(3), left,
                   {"target": _img((255, 153)), "base": _img((255, 255))}, "base", "b"),
        # random pair (empty mask): winner wrong, loser correct; differ by 255 on the left half
        PairRecord("p", 5, 6, {"base": 0.2, "target": 0.2}, {}, {}, [], "m", _traj(5), _traj(5),
                   torch.zeros(2, 1, 1), {"target": _img((0, 255)), "base": _img((255, 255))}, "target", "c",
                   extra={"kind": "random"}),
        PairRecord("p", 7, 8, {"base": 0.0, "target": 1.0}, {}, {}, [], "m", _traj(7), _traj(7), left,
                   {"target": _img((0, 0)), "base": _img((0, 0))}, "tie", "d"),
    ]
    return recs


def _bright_left(images, prompt):
    """A stand-in checker: an image is 'correct' when its left half is brighter than 128."""
    return [np.asarray(im)[0, 0, 0] > 128 for im in images]


def test_pair_signal_by_hand():
    sig = pair_signal(_signal_records(), _bright_left)
    assert (sig.pairs, sig.ties, sig.checked, sig.scored, sig.masked) == (3, 1, 3, 3, 2)
    # winners correct: yes, yes, no; losers correct: no, yes, yes
    assert sig.p_winner_correct == pytest.approx(2 / 3) and sig.p_loser_correct == pytest.approx(2 / 3)
    assert sig.checker_gap == pytest.approx(0.0) and sig.winner_only == pytest.approx(1 / 3)
    assert sig.loser_only == pytest.approx(1 / 3)
    gaps = [0.3, 0.2, 0.0]  # winner - loser: 0.4 - 0.1, base 0.5 - target 0.3, 0.2 - 0.2
    assert sig.score_gap == pytest.approx(np.mean(gaps)) and sig.score_gap_std == pytest.approx(np.std(gaps))
    assert sig.score_gap_positive == pytest.approx(2 / 3)
    assert sig.mask_coverage == pytest.approx(0.5)
    assert sig.diff_in_mask == pytest.approx((155 / 255 + 0.0) / 2)  # the two masked pairs
    assert sig.diff_out_mask == pytest.approx((0.0 + 102 / 255 + 127.5 / 255) / 3)  # random: whole image
    assert pair_signal(_signal_records()).checked == 0 and pair_signal(_signal_records()).checker_gap is None


def test_pair_signal_cli_reads_a_pair_folder(tmp_path, capsys):
    save_pairs(_signal_records(), tmp_path)
    assert cli.main(["pair-signal", "--data", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pairs"] == 3 and out["ties"] == 1 and out["checker"] is None
    assert out["diff_in_mask"] == pytest.approx((155 / 255) / 2)
    assert cli.main(["pair-signal", "--data", str(tmp_path)]) == 0
    assert "diff_out_mask" in capsys.readouterr().out
    assert cli.main(["pair-signal", "--data", str(tmp_path / "none")]) == 2


@pytest.mark.parametrize("command", ["train-on-policy", "pair-signal"])
def test_every_option_states_its_default(command):
    """The CLI's help contract (tests/test_cli.py) for the two subcommands added here."""
    import argparse

    ap = cli.build_parser()
    parser = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.nargs == 0:
            continue
        text = " ".join((action.help % dict(vars(action), prog=parser.prog)).split())
        assert ("(required)" if action.required else "(default: ") in text, f"{command} {action.option_strings}"
