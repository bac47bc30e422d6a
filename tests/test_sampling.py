"""Seeded sampling: exact replay, trajectories and plain-model log-probs."""
import pytest
import torch

from dfusion_core.engine.config import SamplingParams
from dfusion_core.engine.sampling import Stream, denoise, recompute_log_probs, sample

SP = SamplingParams(num_steps=5)


def test_same_seed_replays_bit_identically(every_family):
    a = sample(every_family, "a red dog", [3, 4], SP)
    b = sample(every_family, "a red dog", [3, 4], SP)
    assert torch.equal(a.trajectories[0].latents, b.trajectories[0].latents)
    assert torch.equal(a.trajectories[1].log_probs, b.trajectories[1].log_probs)
    assert not torch.equal(a.trajectories[0].latents[-1], a.trajectories[1].latents[-1])


def test_a_seed_does_not_depend_on_its_batch(sd1):
    """Each image owns its generator: alone or beside others it draws the same x_T and noise."""
    together = sample(sd1, ["a red dog", "a blue cat"], [3, 9], SP).trajectories[0]
    alone = sample(sd1, "a red dog", [3], SP).trajectories[0]
    assert torch.equal(together.latents[0], alone.latents[0])  # x_T bit-identical
    torch.testing.assert_close(together.latents, alone.latents, atol=1e-4, rtol=0)  # kernels may round differently


def test_trajectory_shapes(sd2):
    tr = sample(sd2, "a cat", [0], SP).trajectories[0]
    assert tr.latents.shape == (6, 4, 16, 16)
    assert tr.timesteps.shape == (5,) and tr.timesteps[0] > tr.timesteps[-1]
    assert tr.x0_preds.shape == (5, 4, 16, 16) and tr.log_probs.shape == (5,)


def test_recomputed_log_probs_match_a_plain_trajectory(every_family):
    tr = sample(every_family, "a red dog", [5], SP).trajectories[0]
    lp = recompute_log_probs(every_family, "a red dog", tr, SP, batch_size=3)
    torch.testing.assert_close(lp, tr.log_probs, atol=2e-3, rtol=1e-4)


def test_non_square_images_and_no_cfg(sd1):
    res = sample(sd1, "a dog", [1], SamplingParams(num_steps=3, guidance_scale=1.0, height=48, width=32))
    assert res.images[0].size == (32, 48)


def test_eta_zero_is_deterministic_given_x_T(sd1):
    sp = SamplingParams(num_steps=4, eta=0.0)
    a = sample(sd1, "a dog", [1], sp).trajectories[0]
    assert torch.all(a.log_probs == 0)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_steps=0), "num_steps"), (dict(eta=1.5), "eta"), (dict(guidance_scale=-1), "guidance_scale"),
    (dict(height=30), "height"),
])
def test_invalid_sampling_params(sd1, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        sample(sd1, "a dog", [1], SamplingParams(**kwargs))


@pytest.mark.parametrize("prompt,seeds,msg", [("", [1], "empty"), ("   ", [1], "empty"), ("x" * 1001, [1], "limit"),
                                              ("a dog", [-1], "seed"), ("a dog", ["7"], "seed"), ("a dog", [], "no seeds")])
def test_invalid_prompt_and_seeds(sd1, prompt, seeds, msg):
    with pytest.raises(ValueError, match=msg):
        sample(sd1, prompt, seeds, SP)


def test_denoise_calls_back_with_the_call_its_streams_and_their_steps(sd1):
    """on_call(call_index, active, steps), as documented: a stream starting one call later is one step behind."""
    early, late = Stream(seed=1), Stream(seed=2, offset=1)
    cond = sd1.encode(["a red dog"], "", True, 32, 32)
    calls = []
    denoise(sd1, cond, [early, late], SamplingParams(num_steps=3, height=32, width=32),
            on_call=lambda call, active, steps: calls.append((call, [s.seed for s in active], list(steps))))
    assert calls == [(0, [1], [0]), (1, [1, 2], [1, 0]), (2, [1, 2], [2, 1]), (3, [2], [2])]
