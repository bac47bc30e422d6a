"""Words map to the token positions the text encoder sees (METHOD.md: fix the word-index bug)."""
import pytest

from dfusion_core.prompt_sets import load_prompt_set, paper_prompts
from dfusion_core.tokens import default_keywords, keyword_token_indices, word_tokens


def test_tokenizer_built_offline_matches_clip_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_woolen_maps_to_both_of_its_tokens(tokenizer):
    words = {w.word: w for w in word_tokens(tokenizer, "a black and woolen bus")}
    assert words["woolen"].tokens == ("woo", "len</w>")
    assert words["woolen"].token_indices == (4, 5)
    assert words["bus"].token_indices == (6,)  # not 5, which the word-index rule would give


def test_punctuation_case_and_spacing(tokenizer):
    words = word_tokens(tokenizer, "A Red,  DOG!")
    assert [w.word for w in words] == ["A", "Red", ",", "DOG", "!"]
    assert [w.token_indices for w in words] == [(1,), (2,), (3,), (4,), (5,)]


def test_keywords_absent_or_phrase(tokenizer):
    assert keyword_token_indices(tokenizer, "a cat on the left of a dog", ["left of", "dog"]) == [(5, 6), (8,)]
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        keyword_token_indices(tokenizer, "a cat", ["horse"])


def test_every_occurrence_of_a_keyword(tokenizer):
    assert keyword_token_indices(tokenizer, "a cat and a cat", ["cat"]) == [(2, 5)]


def test_long_prompt_is_truncated_with_warning(tokenizer):
    prompt = " ".join(["red"] * 80) + " zebra"
    with pytest.warns(UserWarning, match="only the first 75"):
        words = word_tokens(tokenizer, prompt)
    assert words[74].token_indices == (75,)
    assert words[75].token_indices == ()
    with pytest.raises(ValueError, match="beyond the 77-token limit"):
        keyword_token_indices(tokenizer, prompt, ["zebra"])


def test_default_keywords_are_content_words(tokenizer):
    assert default_keywords(tokenizer, "the umbrella above the table") == ["umbrella", "table"]
    assert default_keywords(tokenizer, "a red and woolen dog") == ["red", "woolen", "dog"]
    assert default_keywords(tokenizer, "the of a") == []


def test_paper_prompt_sets_give_keyword_words(tokenizer):
    entries = {e.prompt: e for e in paper_prompts("attribute", "train")}
    e = entries["a black and woolen bus"]
    assert e.keywords == ("bus",)  # item index 4 is the word "bus", not token 4 ("woo")
    assert keyword_token_indices(tokenizer, e.prompt, e.keywords) == [(6,)]
    assert len(paper_prompts("action", "train")) == 40
    spatial = load_prompt_set("paper:spatial:test")
    assert len(spatial) == 40 and not set(e.prompt for e in spatial) & set(e.prompt for e in paper_prompts("spatial", "train"))


def test_prompt_set_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_prompt_set("nope:x")
    f = tmp_path / "p.json"
    f.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        load_prompt_set(str(f))
    f2 = tmp_path / "p.txt"
    f2.write_text("a red dog\n\n a blue cat \n")
    assert [e.prompt for e in load_prompt_set(str(f2))] == ["a red dog", "a blue cat"]
