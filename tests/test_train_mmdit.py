"""The default-model trainer (SD3-shaped pipeline on ShapesWorld v2): what it writes loads and samples through
the engine, encodes prompts as the engine does, and --resume continues a run exactly."""
import json

import pytest
import torch

from recipes.shapesworld import train_mmdit

TINY = ["--vae-steps", "2", "--n-scenes", "16", "--batch", "4", "--layers", "1", "--log-every", "1", "--no-bf16", "--threads", "1"]


def _state(out):
    return torch.load(out / "state.pt", weights_only=False)


def _done_row(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "done"][-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Four steps in one go."""
    out = tmp_path_factory.mktemp("mmdit") / "straight"
    train_mmdit.main(["--out", str(out), "--max-steps", "4", *TINY])
    return out


@pytest.mark.slow
def test_run_writes_an_sd3_folder_that_loads_and_samples(straight):
    from dfusion_core import sample
    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.engine.loading import load_model

    model = load_model(straight / "pipeline", device="cpu")
    assert model.kind == "sd3" and model.pipe.text_encoder_3 is None and model.pipe.tokenizer_3 is None
    assert model.defaults["world_version"] == 2 and model.defaults["eta"] == 0.7 and model.default_size() == (64, 64)
    assert model.pipe.vae.config.shift_factor == 0.0
    assert model.pipe.transformer.dtype == torch.float32  # fp16 on disk, loaded as fp32 on the CPU
    res = sample(model, "a red circle", [0, 1], SamplingParams(num_steps=2))
    assert [im.size for im in res.images] == [(64, 64), (64, 64)]


def test_pooled_vector_is_the_text_encoders_own_and_training_sees_the_engines_conditioning(straight):
    from dfusion_core.engine.loading import load_model

    model = load_model(straight / "pipeline", device="cpu")
    te = model.pipe.text_encoder
    assert torch.equal(te.text_projection.weight, torch.eye(te.config.hidden_size, dtype=te.dtype))
    cond = model.encode(["a red circle"], "", True, 64, 64)
    embeds, pooled = train_mmdit.encode_captions(model.pipe, ["a red circle", ""])
    torch.testing.assert_close(cond.cond[0], embeds[0])
    torch.testing.assert_close(cond.uncond[0], embeds[1])
    torch.testing.assert_close(cond.added_cond["pooled_projections"][0], pooled[0])
    assert embeds.shape[1:] == (77, model.pipe.transformer.config.joint_attention_dim)


@pytest.mark.slow
def test_resume_continues_exactly(straight, tmp_path):
    out = tmp_path / "split"
    train_mmdit.main(["--out", str(out), "--max-steps", "2", *TINY])
    assert _state(out)["step"] == 2
    with pytest.raises(SystemExit):  # an existing run is never restarted silently
        train_mmdit.main(["--out", str(out), "--max-steps", "4", *TINY])
    train_mmdit.main(["--out", str(out), "--max-steps", "4", "--resume", *TINY])
    a, b = _state(straight), _state(out)
    assert a["step"] == b["step"] == 4
    assert _done_row(out)["last_loss"] == _done_row(straight)["last_loss"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_the_fusion_form_written_with_a_model_follows_its_token_grid():
    """Two cells of mask growth on v2's 8x8 token grid, one on v3's 16x16 (patch 1); the rest of the form alike."""
    v2 = train_mmdit.dfusion_defaults(train_mmdit.MMDiTConfig())
    v3 = train_mmdit.dfusion_defaults(train_mmdit.MMDiTConfig(patch=1, world_version=3))
    assert (v2["dilate"], v3["dilate"]) == (2, 1) and v3["world_version"] == 3
    assert all(v2[k] == v3[k] for k in ("union_base", "start_step", "layers", "hold_outside"))


def test_retrain_v3_runs_the_lr_1e3_stage_then_the_anneal_from_its_weights(tmp_path, monkeypatch):
    """retrain --world-version 3: patch 1 on v3 scenes from the v2 model's blocks, then the anneal started from
    that run's pipeline; once the anneal has a checkpoint, a re-run resumes it and never re-enters the first run.
    A second model installs beside the default with its identical components linked, not copied."""
    from recipes.shapesworld import retrain

    calls = []
    monkeypatch.setattr(train_mmdit, "main", lambda argv: calls.append(argv))
    cfg = retrain.RetrainConfig(world_version=3, v3_steps=7, v3_anneal_steps=3, v3_anneal_lr=2e-4, threads=1)
    gen = tmp_path / "shapesworld"
    retrain._generator(cfg, gen)
    first, anneal = calls
    arg = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert arg(first, "--init") == cfg.v3_init and arg(first, "--max-steps") == "7" and arg(first, "--patch") == "1"
    assert arg(first, "--world-version") == "3" and "--no-bf16" in first and "--resume" not in first
    assert arg(anneal, "--out") == str(gen) and arg(anneal, "--init") == str(tmp_path / "shapesworld-lr1e-3" / "pipeline")
    assert arg(anneal, "--lr") == "0.0002" and arg(anneal, "--max-steps") == "3"
    gen.mkdir()
    (gen / "state.pt").write_bytes(b"")
    calls.clear()
    retrain._generator(cfg, gen)
    assert len(calls) == 1 and "--resume" in calls[0] and arg(calls[0], "--out") == str(gen)

    assets = tmp_path / "assets"
    for folder in ("shapesworld", "src"):
        for part, content in (("text_encoder", b"same"), ("vae", b"same" if folder == "shapesworld" else b"retrained")):
            (assets / folder / part).mkdir(parents=True)
            (assets / folder / part / "w.safetensors").write_bytes(content)
    monkeypatch.setattr(retrain, "ASSETS", assets)
    retrain._install_beside_default(assets / "src", assets / "shapesworld-v2")
    v2 = assets / "shapesworld-v2"
    assert (v2 / "text_encoder").is_symlink() and (v2 / "text_encoder").resolve() == (assets / "shapesworld" / "text_encoder")
    assert not (v2 / "vae").is_symlink() and (v2 / "vae" / "w.safetensors").read_bytes() == b"retrained"
