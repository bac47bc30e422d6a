"""Prompts a model cannot draw are said at the prompt (issue 15 item 13), and the app serves its page before its
model is loaded (item 9): the world's grammar, the token limit, the loading status every handler answers with."""
import runpy
import shutil
import time
from pathlib import Path

import pytest

from dfusion_core.worlds.registry import explain_prompt
from dfusion_core.worlds import discover

discover()
SHAPES = {"world": "shapesworld"}
LONG = "a red circle above a blue square " + " ".join(["and a green triangle"] * 20) + " with a red border"


def test_shapesworld_names_the_words_it_does_not_know():
    (note,) = explain_prompt(SHAPES, "a photo of a cat")
    assert "'photo', 'cat'" in note and "vocabulary" in note and "circle" in note  # what it knows, too
    assert "'of'" not in note  # 'of' is ShapesWorld's ("on the left of")
    (note,) = explain_prompt(SHAPES, "a red 🐶 ★")  # symbols are not words it knows (it said 'every word is known')
    assert "'🐶'" in note and "'★'" in note and "every word is known" not in note


def test_shapesworld_accepts_its_captions_and_names_a_sentence_outside_its_grammar():
    for caption in ("the red circle above the blue square", "A red and striped circle.", "a red circle"):
        assert explain_prompt(SHAPES, caption) == [], caption
    (note,) = explain_prompt(SHAPES, "a red circle above a red square")  # known words, not a caption
    assert note.startswith("not a ShapesWorld caption") and "differ in colour" in note


def test_a_model_without_a_world_gets_no_grammar_warning():
    assert explain_prompt({}, "a photo of a cat") == [] and explain_prompt({"world": "nowhere"}, "x") == []


@pytest.fixture()
def svc(sd1, tmp_path):
    from app.service import AppService
    return AppService(sd1, store_dir=tmp_path / "store")


def test_the_app_warns_when_the_prompt_is_cut_by_the_token_limit(svc):
    (note,) = svc.prompt_notes(LONG)
    # 91 one-token words; 75 reach the encoder: the last 16 are cut (shown from the first, shortened)
    assert "77 tokens" in note and "from 'and a green triangle and a green" in note and "cut (16 words" in note
    assert svc.prompt_notes("a red dog") == [] and svc.prompt_notes("") == []  # an empty prompt: its check says why
    words, kws = svc.words(LONG)
    assert "red" in kws and ("border (past the 77-token limit)", "border") in words


def test_the_app_shows_the_worlds_warning_for_a_model_trained_on_it(svc):
    svc.model_defaults = {**svc.model_defaults, **SHAPES}
    assert svc.has_checker()
    (note,) = svc.prompt_notes("a photo of a cat")
    assert "'photo', 'cat'" in note
    cut, grammar = svc.prompt_notes(LONG)  # cut first, then the world's words
    assert "77 tokens" in cut and "'with', 'border'" in grammar
    (grammar,) = svc.prompt_notes("the red circle containing the blue square")
    assert grammar.startswith("not a ShapesWorld caption")


def test_examples_fit_the_loaded_model(svc):
    from dfusion_core.worlds.shapesworld.world import parse_prompt
    svc.model_defaults = {**svc.model_defaults, **SHAPES}
    assert svc.example_prompts() and all(parse_prompt(p) is not None for p in svc.example_prompts())


# ---- start-up: the page before the model ---------------------------------------------------------------
@pytest.mark.slow
def test_a_background_service_refuses_model_calls_until_loaded_then_serves(sd1, pipelines_dir, tmp_path):
    from app.service import AppService, Session, UserError

    svc = AppService(pipelines_dir / "sd1", store_dir=tmp_path / "store", background=True,
                     load_options={"device": "cpu"}, make_scorer=lambda: "the scorer")
    assert not svc.ready and svc.default_sampling.num_steps > 0 and svc.example_prompts() is not None
    assert "still loading" in svc.model_status()
    with pytest.raises(UserError, match="still loading"):
        svc.sample_candidates(Session(), "a red dog", 2, 0, svc.sampling(2, 2.0, 1.0))
    assert svc.list_pairs("", "any") == []  # the store works meanwhile
    svc.start_loading()
    assert svc.wait_ready(120) and svc.scorer == "the scorer"
    assert svc.model_status().startswith("model `sd1` ready (loaded in")
    svc.scorer = None
    assert len(svc.sample_candidates(Session(), "a red dog", 2, 0, svc.sampling(2, 2.0, 1.0)).candidates) == 2


def test_a_model_that_fails_to_load_is_said_on_the_page_and_a_missing_one_at_once(pipelines_dir, tmp_path):
    from app.service import AppService, UserError
    from dfusion_core.engine.loading import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(pipelines_dir / "sd1", broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.write_bytes(b"not weights")
    svc = AppService(broken, store_dir=tmp_path / "store", background=True, load_options={"device": "cpu"})
    svc.start_loading()
    assert not svc.wait_ready(120)
    assert svc.model_status().startswith("the model `broken` could not be loaded:")
    with pytest.raises(UserError, match="could not be loaded"):
        svc.words("a red dog")
    with pytest.raises(ModelLoadError, match="does not exist"):
        AppService(tmp_path / "nowhere", store_dir=tmp_path / "store2", background=True)


def test_app_py_refuses_a_missing_model_folder_before_serving(tmp_path, capsys):
    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "app.py"))["main"]
    t = time.perf_counter()
    assert main(["--model", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err and time.perf_counter() - t < 60


def test_names_scores_and_captions_as_the_page_shows_them(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from app.service import model_name, score_cell
    from app.views import candidate_caption

    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets" / "m").mkdir(parents=True)
    assert model_name(str(tmp_path / "assets" / "m")) == "assets/m"  # under the working folder: relative
    assert model_name("/somewhere/else/model") == "model" and model_name("org/model-id") == "org/model-id"
    assert model_name(str(Path.home() / "runs" / "dpo-1")) == "~/runs/dpo-1"  # under the home folder: ~/...
    assert score_cell(0.28123456789012345) == 0.281 and score_cell(None) is None
    c = SimpleNamespace(seed=3, score=0.28123, correct=False)
    assert candidate_caption(c) == "seed 3 · 0.281 · ✗"
    assert candidate_caption(c, "reference") == "REF · seed 3 · 0.281 · ✗"
    assert candidate_caption(c, "base").startswith("BASE · seed 3")
