"""Early stopping: the validation record, the trainer's best checkpoint, held-out pairs."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from dfusion_core.engine.config import SamplingParams
from dfusion_core.pairs.build import PairingParams, build_pairs, save_pairs
from dfusion_core.training.data import load_training_pairs
from dfusion_core.training.early_stopping import EarlyStopping
from dfusion_core.training.trainer import TrainConfig, Trainer, split_validation

from test_training import brightness


def test_the_record_keeps_the_best_and_stops_after_patience(tmp_path):
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(1, 0.50) and es.best_step == 1
    assert es.update(2, 0.60)
    assert not es.update(3, 0.605)  # within min_delta: not better
    assert not es.should_stop
    assert not es.update(4, 0.40)
    assert es.should_stop and es.stopped_at == 4 and es.best_step == 2
    es.save(tmp_path / "v.json")
    again = EarlyStopping.load(tmp_path / "v.json", patience=5)
    assert (again.best_step, again.best_score, again.patience) == (2, 0.60, 5)
    assert EarlyStopping.load(tmp_path / "absent.json", patience=3).best_score is None
    never = EarlyStopping(patience=0)
    never.update(1, 1.0)
    for k in range(2, 20):
        never.update(k, 0.0)
    assert not never.should_stop


@pytest.fixture(scope="module")
def pairs(sd1, tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    recs = build_pairs(sd1, ["a red dog", "a blue cat", "a green bird"], brightness, SamplingParams(num_steps=4),
                       pairing=PairingParams(num_candidates=4))
    save_pairs(recs, d)
    return load_training_pairs(d)


def test_held_out_pairs_are_never_trained_on_and_the_split_is_seeded(pairs):
    many = [copy.copy(p) for p in pairs * 4]  # distinct objects: the split is by position
    train, held = split_validation(many, 0.25, seed=0)
    assert len(held) == max(2, round(len(many) * 0.25)) and len(train) + len(held) == len(many)
    assert not {id(p) for p in train} & {id(p) for p in held}
    assert [id(p) for p in split_validation(many, 0.25, seed=0)[1]] == [id(p) for p in held]
    assert split_validation(many, 0.0, seed=0) == (many, [])
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=0.6).validate()
    assert split_validation(many[:9], 0.5, seed=0) == (many[:9], [])  # too few to hold any out


def test_the_trainer_keeps_the_best_checkpoint_and_stops_after_patience(sd1, pairs, tmp_path):
    scores = iter([0.4, 0.5, 0.7, 0.6, 0.65, 0.9])  # steps 0-5: best at step 2; 3 and 4 do not beat it: stop at 4
    states = {}

    def validate(tr):
        states[tr.step] = {k: v.clone() for k, v in tr.trainable_state().items()}
        return {"score": next(scores)}

    cfg = TrainConfig(algo="dpo", steps=10, batch_size=2, lr=1e-3, ckpt_every=1, patience=2)
    tr = Trainer(sd1, pairs, cfg, tmp_path)
    try:
        tr.run(progress=False, validate=validate)
        assert tr.step == 4 and [v["step"] for v in tr.validations] == [0, 1, 2, 3, 4]
        assert json.loads((tmp_path / "validation.json").read_text())["best_step"] == 2
        assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").is_file()
        assert tr.restore_best() == 2
        now = tr.trainable_state()
        assert any(not torch.equal(now[k], states[4][k]) for k in now)  # the last step's weights are gone
        for k in now:
            torch.testing.assert_close(now[k], states[2][k])
        rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r.get("stage") == "validation"] == [0, 1, 2, 3, 4]
        assert rows[-1] == {"stage": "early_stopping", "best_step": 2, "last_step": 4, "stopped_early": True,
                            "best_score": 0.7}
        result = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))  # OUT's adapter is the best one
        best = load_file(str(tmp_path / "best" / "pytorch_lora_weights.safetensors"))
        assert result.keys() == best.keys() and all(torch.equal(result[k], best[k]) for k in result)
    finally:
        tr.unload()
    again = Trainer(sd1, pairs, cfg, tmp_path)  # resumed after it stopped: nothing left to train or validate
    try:
        again.run(progress=False, validate=validate)
        assert again.step == 4 and again.validations == tr.validations  # the validations made before the resume
    finally:
        again.unload()


def test_held_out_metrics_repeat_exactly_and_default_validation_uses_them(sd1, pairs, tmp_path):
    many = [copy.copy(p) for p in pairs * 6]
    cfg = TrainConfig(algo="dpo", steps=2, batch_size=2, lr=1e-3, ckpt_every=1, val_fraction=0.3, patience=0)
    tr = Trainer(sd1, many, cfg, tmp_path)
    try:
        a, b = tr.held_out_metrics(draws=3), tr.held_out_metrics(draws=3)
        assert a == b and a["val_pairs"] == len(tr.val_pairs) and 0.0 <= a["score"] <= 1.0
        assert a["score"] == a["val_implicit_acc"]
        tr.run(progress=False)
        assert [v["step"] for v in tr.validations] == [0, 1, 2]
        assert tr.net.training  # validation leaves the network in training mode
    finally:
        tr.unload()


def test_a_run_that_never_beats_the_plain_model_ends_as_the_plain_model(sd1, pairs, tmp_path):
    """Validation before the first step scores the untrained adapter; when no checkpoint beats it, best_step is 0
    and the adapter restored is the untrained one (LoRA's zero up-projection: the plain model's outputs)."""
    scores = iter([0.6, 0.5, 0.55, 0.4])
    start = {}

    def validate(tr):
        if tr.step == 0:
            start.update({k: v.clone() for k, v in tr.trainable_state().items()})
        return {"score": next(scores)}

    cfg = TrainConfig(algo="dpo", steps=10, batch_size=2, lr=1e-3, ckpt_every=1, patience=3)
    tr = Trainer(sd1, pairs, cfg, tmp_path)
    try:
        tr.run(progress=False, validate=validate)
        assert tr.step == 3 and tr.restore_best() == 0
        now = tr.trainable_state()
        assert all(torch.equal(now[k], start[k]) for k in now)
        assert all(not v.any() for k, v in now.items() if "lora_B" in k)
    finally:
        tr.unload()
