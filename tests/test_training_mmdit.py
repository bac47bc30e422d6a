"""Training on an SD3-shaped MMDiT through the family seam: rectified-flow noising, Diffusion-DPO on the velocity
error (by hand), LoRA on the transformer's joint attention, trajectory methods on Flow-GRPO SDE log-probs, and
the exported LoRA loading back with load_model(..., lora=...)."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dfusion_core.engine.config import SamplingParams
from dfusion_core.pairs.build import PairingParams, build_pairs
from dfusion_core.training.data import pairs_from_records
from dfusion_core.training.trainer import TrainConfig, Trainer, _step_generator

SP = SamplingParams(num_steps=4, eta=0.7, guidance_scale=3.0)


def brightness(images, prompts):
    return np.array([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


@pytest.fixture(scope="module")
def sd3_pairs(sd3):
    """D-Fusion pairs sampled with the SDE (noise level 0.7) and fused on the tiny MMDiT."""
    recs = build_pairs(sd3, ["a red dog", "a blue cat"], brightness, SP, pairing=PairingParams(num_candidates=4))
    return pairs_from_records(recs)


def test_flow_training_point_is_the_rectified_flow_interpolation(sd3):
    fam = sd3.family
    sched = fam.schedule(sd3.pipe.scheduler, 4)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    idx = torch.tensor([0, 500, 999])
    x_t, target, t = fam.train_noised(sched, x0, noise, idx)
    sigma = sched.train_sigmas[idx].float().view(-1, 1, 1, 1)
    assert float(sched.train_sigmas[0]) == 1.0 and len(sched.train_sigmas) == sched.num_train_timesteps
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(target, noise - x0)  # the velocity
    torch.testing.assert_close(t, sigma.flatten() * 1000)  # what the transformer is given, as when sampling


def test_lora_adapts_the_joint_attention_of_both_streams(sd3, sd3_pairs, tmp_path):
    tr = Trainer(sd3, sd3_pairs, TrainConfig(algo="dpo", steps=1, batch_size=2), tmp_path)
    try:
        keys = tr.trainable_state().keys()
    finally:
        tr.unload()
    for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert any(f"transformer_blocks.0.attn.{proj}.lora_A" in k for k in keys), proj


def test_flow_dpo_loss_equals_a_hand_computed_value(sd3, sd3_pairs, tmp_path):
    """Velocity errors of winner and loser on the same noised point, policy vs reference, in the beta/2 form."""
    beta = 5000.0
    tr = Trainer(sd3, sd3_pairs, TrainConfig(algo="dpo", steps=1, batch_size=2, dpo_beta=beta), tmp_path)
    try:
        with torch.no_grad():  # move the LoRA off zero so policy and reference differ
            for p in tr.params:
                p.add_(0.05 * torch.randn_like(p))
            loss, _ = tr._loss_dpo(_step_generator(0, 3))
            g = _step_generator(0, 3)  # the same draws, by hand
            idx = torch.randint(0, len(sd3_pairs), (2,), generator=g)
            k = torch.randint(0, 1000, (2,), generator=g)
            noise = torch.randn((2, *sd3_pairs[0].winner.latents[-1].shape), generator=g)
            sigma = tr.schedule.train_sigmas[k].float().view(-1, 1, 1, 1)
            pairs = [sd3_pairs[int(i)] for i in idx]
            w = torch.stack([p.winner.latents[-1] for p in pairs])
            lo = torch.stack([p.loser.latents[-1] for p in pairs])
            cond = sd3.encode([p.prompt for p in pairs], "", False, *sd3.default_size())
            net = sd3.denoiser

            def errors(x0w, x0l):  # one call on [winners; losers], the trainer's layout (beta amplifies rounding)
                x0, nz, sg = torch.cat([x0w, x0l]), torch.cat([noise, noise]), torch.cat([sigma, sigma])
                out = net(hidden_states=(1 - sg) * x0 + sg * nz, timestep=sg.flatten() * 1000,
                          encoder_hidden_states=torch.cat([cond.cond, cond.cond]),
                          pooled_projections=torch.cat([cond.added_cond["pooled_projections"]] * 2)).sample
                e = ((out - (nz - x0)) ** 2).mean(dim=(1, 2, 3))
                return e[:2], e[2:]

            ew, el = errors(w, lo)
            net.disable_adapters()
            rw, rl = errors(w, lo)
            net.enable_adapters()
    finally:
        tr.unload()
    softplus = lambda z: max(z, 0.0) + math.log1p(math.exp(-abs(z)))  # -log sigmoid(-z), overflow-free
    want = [softplus(0.5 * beta * ((a - b) - (c - d)))  # -log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref)))
            for a, b, c, d in zip(ew.tolist(), el.tolist(), rw.tolist(), rl.tolist())]
    assert abs(loss.item() - sum(want) / 2) < 1e-4 * max(1.0, abs(loss.item()))
    assert (ew - rw).abs().max() > 1e-6  # the hand computation did see the adapter


def test_one_dpo_step_moves_the_transformer_lora(sd3, sd3_pairs, tmp_path):
    tr = Trainer(sd3, sd3_pairs, TrainConfig(algo="dpo", steps=1, batch_size=2, lr=1e-2), tmp_path)
    try:
        before = tr.trainable_state()
        row = tr.train_step()
        after = tr.trainable_state()
    finally:
        tr.unload()
    assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4


@pytest.mark.parametrize("algo", ["ddpo", "traj-dpo"])
def test_trajectory_methods_train_on_sde_pairs(sd3, sd3_pairs, tmp_path, algo):
    tr = Trainer(sd3, sd3_pairs, TrainConfig(algo=algo, steps=1, batch_size=2, steps_per_trajectory=2), tmp_path)
    try:
        # an unfused sample's recorded SDE log-probs are the plain model's, recomputed in one batched pass
        base = [i for i, t in enumerate(tr.trajs) if any(t is p.loser for p in sd3_pairs)]
        if algo == "ddpo":
            for i in base[:2]:
                torch.testing.assert_close(tr.plain_logp[i], tr.trajs[i].log_probs, atol=2e-3, rtol=1e-3)
        row = tr.train_step()
    finally:
        tr.unload()
    assert np.isfinite(row["loss"]) and row["grad_norm"] > 0


@pytest.mark.slow
def test_exported_transformer_lora_loads_back_and_changes_samples(pipelines_dir, sd3_pairs, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from dfusion_core.engine.loading import load_model
    from dfusion_core.engine.sampling import sample

    m = load_model(pipelines_dir / "sd3", device="cpu")
    tr = Trainer(m, sd3_pairs, TrainConfig(algo="dpo", steps=2, batch_size=2, lr=5e-2), tmp_path)
    tr.run(progress=False)
    trained = tr.trainable_state()
    tr.unload()
    assert any(k.startswith("transformer.") for k in load_file(str(tmp_path / "pytorch_lora_weights.safetensors")))
    tuned_model = load_model(pipelines_dir / "sd3", device="cpu", lora=tmp_path)
    loaded = get_peft_model_state_dict(tuned_model.denoiser, adapter_name=next(iter(tuned_model.denoiser.peft_config)))
    assert loaded.keys() == trained.keys()  # every adapted projection came back, add_*_proj and to_* alike
    for k in trained:
        torch.testing.assert_close(loaded[k], trained[k])
    plain = sample(m, "a red dog", [1], SP).trajectories[0]
    tuned = sample(tuned_model, "a red dog", [1], SP).trajectories[0]
    assert torch.equal(plain.latents[0], tuned.latents[0])
    assert (plain.final - tuned.final).abs().max() > 1e-4


def test_pairs_drawn_with_flow_ddim_train_on_ddim_log_probs(sd3, tmp_path):
    """The trainer steps with the sampler that drew the pairs: an unfused base's recomputed log-probs equal the
    ones recorded while sampling (under the SDE they would differ by nats per element)."""
    from dataclasses import replace

    sp = SamplingParams(num_steps=4, eta=0.7, guidance_scale=3.0, flow_sampler="ddim")
    recs = build_pairs(sd3, ["a red dog", "a blue cat"], brightness, sp, pairing=PairingParams(num_candidates=4))
    pairs = pairs_from_records(recs)
    assert {p.flow_sampler for p in pairs} == {"ddim"}
    tr = Trainer(sd3, pairs, TrainConfig(algo="ddpo", steps=1, batch_size=2), tmp_path)
    try:
        assert tr.sampling.flow_sampler == "ddim"
        base = [i for i, t in enumerate(tr.trajs) if any(t is p.loser for p in pairs)]
        for i in base[:2]:
            torch.testing.assert_close(tr.plain_logp[i], tr.trajs[i].log_probs, atol=2e-3, rtol=1e-3)
    finally:
        tr.unload()
    with pytest.raises(ValueError, match="different flow samplers"):
        Trainer(sd3, [pairs[0], replace(pairs[1], flow_sampler="sde")], TrainConfig(algo="dpo", steps=1), tmp_path)


def test_logit_normal_weighting_draws_the_pretraining_noise_levels(sd3, sd3_pairs, tmp_path):
    """weighting=logit_normal: the DPO step's sigmas are sigma(index = floor(sigmoid(N(0,1)) * T)) from the step's
    generator, as diffusers' SD3 script draws them; uniform draws spread over the whole schedule."""
    from dfusion_core.training.trainer import train_timestep_indices

    g = torch.Generator().manual_seed(0)
    uni = train_timestep_indices("uniform", 1000, 20000, g).float() / 1000
    ln = train_timestep_indices("logit_normal", 1000, 20000, g).float() / 1000
    assert abs(uni.std() - 0.289) < 0.01 and abs(ln.std() - 0.21) < 0.01  # sigmoid(N(0,1)) has std ~0.21
    assert abs(ln.mean() - 0.5) < 0.01 and (ln < 0.05).float().mean() < 0.01
    tr = Trainer(sd3, sd3_pairs, TrainConfig(algo="dpo", steps=1, batch_size=2, weighting="logit_normal"), tmp_path)
    try:
        _, _, t_in, _, _ = tr._noised_pairs(_step_generator(0, 4))
        g = _step_generator(0, 4)
        torch.randint(0, len(sd3_pairs), (2,), generator=g)  # the pair draw comes first
        idx = (torch.sigmoid(torch.randn(2, generator=g)) * 1000).long()
        torch.testing.assert_close(t_in, torch.cat([tr.schedule.train_sigmas[idx]] * 2).float() * 1000)
    finally:
        tr.unload()
    with pytest.raises(ValueError, match="weighting must be one of"):
        TrainConfig(weighting="cosmap").validate()


def test_dpok_kl_on_flow_grpos_scale_is_the_exact_kl_times_the_step(sd3, sd3_pairs, sd1, tmp_path):
    tr = Trainer(sd3, sd3_pairs, TrainConfig(algo="dpok", steps=1, batch_size=2), tmp_path)
    try:
        with torch.no_grad():
            for p in tr.params:  # the policy away from the frozen model, so the KL is not 0
                p.add_(0.05 * torch.randn_like(p))
            trajs, prompts = tr.trajs[:2], tr.traj_prompts[:2]
            old, adv = torch.stack([tr.plain_logp[i][2] for i in range(2)]), torch.ones(2)
            _, exact = tr._pg_objective(trajs, [2, 2], prompts, old, adv)
            tr.cfg.kl_scale = "flow_grpo"
            _, scaled = tr._pg_objective(trajs, [2, 2], prompts, old, adv)
    finally:
        tr.unload()
    dt = float(tr.schedule.sigmas[2] - tr.schedule.sigmas[3])
    assert exact["kl"] > 0 and 0 < dt < 1
    assert abs(scaled["kl"] - exact["kl"] * dt) < 1e-6 * max(1.0, exact["kl"])
    with pytest.raises(ValueError, match="needs a flow model"):
        from dfusion_core.engine.config import SamplingParams as SP1
        pairs1 = pairs_from_records(build_pairs(sd1, ["a red dog", "a blue cat"], brightness, SP1(num_steps=3),
                                                pairing=PairingParams(num_candidates=4)))
        Trainer(sd1, pairs1, TrainConfig(algo="dpok", steps=1, batch_size=2, kl_scale="flow_grpo"), tmp_path / "u")


def test_a_checkpoints_adapter_loads_as_the_network_had_it_and_sft_fits_given_latents(sd3, tmp_path):
    """render_sft's pieces: SFT on bare final latents (render_pairs: no trajectory behind them) trains, and a
    trainer checkpoint's adapter written by checkpoint_lora computes what the trained network computed (the run's
    top-level adapter is its best checkpoint's, which may be step 0)."""
    from experiments.shapesworld.render_sft import checkpoint_lora, render_pairs

    g = torch.Generator().manual_seed(0)
    latents = {p: torch.randn(3, 4, 8, 8, generator=g) for p in ("a red dog", "a blue cat")}
    pairs = render_pairs(sd3, latents, SP)
    assert len(pairs) == 6 and all(p.winner.latents.shape == (1, 4, 8, 8) for p in pairs)
    tr = Trainer(sd3, pairs, TrainConfig(algo="sft", steps=2, batch_size=2, lr=1e-2, lora_rank=4, ckpt_every=2),
                 tmp_path / "run")
    tr.run(progress=False)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    cond = tr._embed(["a red dog"])
    with torch.no_grad():
        trained = tr._forward(tr.net, x, t, cond, False)
    tr.unload()
    folder = checkpoint_lora(sd3, tmp_path / "run" / "checkpoints" / "step-000002" / "state.pt", tmp_path / "lora")
    sd3.load_lora(folder, "probe")
    try:
        with torch.no_grad():
            loaded = tr._forward(sd3.denoiser, x, t, cond, False)
        sd3.use_lora(None)
        with torch.no_grad():
            plain = tr._forward(sd3.denoiser, x, t, cond, False)
    finally:
        sd3.use_lora(None)
        sd3.unload_lora("probe")
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert (loaded - plain).abs().max() > 1e-4  # the adapter moved the network
