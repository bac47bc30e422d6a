"""Words map to the token positions the text encoder sees (docs/METHOD.md: fix the word-index bug)."""
import pytest

from dfusion_core.pairs.prompt_sets import load_prompt_set, paper_prompts
from dfusion_core.engine.tokens import default_keywords, keyword_token_indices, word_tokens


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


# ---- words in any script (issue 10, bug 1) ---------------------------------------------------------------
# A word is what a reader sees between spaces and punctuation; it owns exactly the tokens whose BPE pieces spell it.

def _spelled(tokenizer, w):
    """The word as its own tokens spell it, after CLIP's normalisation (NFC, lower case)."""
    return "".join(tokenizer.decode(tokenizer.convert_tokens_to_ids(list(w.tokens))).split())


def _check_partition(tokenizer, prompt):
    """Every token the encoder sees belongs to exactly one word, and each word's tokens spell that word."""
    import unicodedata
    words = word_tokens(tokenizer, prompt, warn=False)
    owned = [i for w in words for i in w.token_indices]
    assert sorted(owned) == list(range(1, len(tokenizer(prompt).input_ids) - 1)), prompt
    for w in words:
        assert w.word == prompt[w.start:w.end]
        assert _spelled(tokenizer, w) == unicodedata.normalize("NFC", w.word).lower(), (prompt, w)
    return words


def test_accented_words_are_whole_and_own_their_pieces(tokenizer):
    words = _check_partition(tokenizer, "a café with naïve décor")
    assert [(w.word, w.token_indices, w.tokens) for w in words] == [
        ("a", (1,), ("a</w>",)), ("café", (2,), ("cafÃ©</w>",)), ("with", (3,), ("with</w>",)),
        ("naïve", (4, 5, 6), ("na", "Ã¯", "ve</w>")), ("décor", (7, 8), ("dÃ©", "cor</w>"))]
    assert keyword_token_indices(tokenizer, "a café with naïve décor", ["naïve", "DÉCOR"]) == [(4, 5, 6), (7, 8)]


def test_accent_split_across_byte_pieces_and_names(tokenizer):
    words = _check_partition(tokenizer, "crème brûlée")
    assert [(w.word, w.token_indices) for w in words] == [("crème", (1, 2, 3)), ("brûlée", (4, 5, 6, 7, 8))]
    assert words[1].tokens == ("br", "Ã", "»", "l", "Ã©e</w>")  # û is two byte pieces with the same offsets
    words = _check_partition(tokenizer, "Pokémon in São Paulo")
    assert [(w.word, w.token_indices) for w in words] == [("Pokémon", (1,)), ("in", (2,)), ("São", (3,)),
                                                         ("Paulo", (4,))]
    assert keyword_token_indices(tokenizer, "Pokémon in São Paulo", ["são paulo", "pokémon"]) == [(3, 4), (1,)]


def test_decomposed_accent_stays_in_its_word(tokenizer):
    prompt = "a cafe\u0301 bar"  # e + combining acute: the tokenizer composes it (NFC) into one piece
    words = word_tokens(tokenizer, prompt)
    assert [(w.word, w.token_indices, w.tokens) for w in words] == [
        ("a", (1,), ("a</w>",)), ("cafe\u0301", (2,), ("cafÃ©</w>",)), ("bar", (3,), ("bar</w>",))]
    assert keyword_token_indices(tokenizer, prompt, ["caf\u00e9"]) == [(2,)]  # typed precomposed, still found


def test_greek_cyrillic_and_cjk_words(tokenizer):
    words = _check_partition(tokenizer, "ΚΑΛΗΜΕΡΑ κόσμε Привет мир")
    assert [(w.word, w.token_indices) for w in words] == [
        ("ΚΑΛΗΜΕΡΑ", tuple(range(1, 17))), ("κόσμε", tuple(range(17, 27))), ("Привет", tuple(range(27, 34))),
        ("мир", (34, 35, 36, 37))]
    # a piece that ends in the first byte of "в" and the piece holding its second byte both belong to the word
    assert words[2].tokens == ("Ð¿", "ÑĢ", "Ð¸Ð", "²", "Ðµ", "Ñ", "Ĥ</w>")
    words = _check_partition(tokenizer, "東京タワー 猫")
    assert [(w.word, w.token_indices) for w in words] == [("東京タワー", tuple(range(1, 8))), ("猫", (8, 9, 10))]
    assert default_keywords(tokenizer, "東京タワー 猫") == ["東京タワー", "猫"]


def test_hyphen_apostrophe_and_digit_words(tokenizer):
    words = _check_partition(tokenizer, "ice-cream dog's 3d 2024 1.5 m, rock’n’roll dogs'")
    assert [(w.word, w.token_indices) for w in words] == [
        ("ice-cream", (1, 2, 3)), ("dog's", (4, 5)), ("3d", (6, 7)), ("2024", (8, 9, 10, 11)), ("1.5", (12, 13, 14)),
        ("m", (15,)), (",", (16,)), ("rock’n’roll", tuple(range(17, 24))), ("dogs", (24,)), ("'", (25,))]
    assert words[0].tokens == ("ice</w>", "-</w>", "cream</w>") and words[1].tokens == ("dog</w>", "'s</w>")
    assert default_keywords(tokenizer, "an ice-cream and 2024") == ["ice-cream", "2024"]


def test_emoji_are_words_and_punctuation_runs_are_one(tokenizer):
    words = _check_partition(tokenizer, "I love 🍕🐶 pizza... a 👍🏽 🇯🇵 👨\u200d👩\u200d👧 ❤️?!")
    assert [(w.word, w.token_indices) for w in words] == [
        ("I", (1,)), ("love", (2,)), ("🍕", (3,)), ("🐶", (4,)), ("pizza", (5,)), ("...", (6,)), ("a", (7,)),
        ("👍🏽", (8,)), ("🇯🇵", (9,)), ("👨\u200d👩\u200d👧", (10, 11, 12, 13)), ("❤️", (14,)), ("?!", (15,))]
    assert keyword_token_indices(tokenizer, "a 👍🏽?!", ["?!", "👍🏽"]) == [(4,), (2, 3)]  # "?!" is one piece
    assert default_keywords(tokenizer, "a 🐶 on a 🛹!") == ["🐶", "🛹"]


def test_words_past_the_limit_are_reported_truncated(tokenizer):
    prompt = " ".join(["red"] * 74) + " naïve zebra"  # naïve's pieces sit at 75 (kept), 76 and 77 (cut)
    with pytest.warns(UserWarning, match="only the first 75"):
        words = word_tokens(tokenizer, prompt)
    assert len(words) == 76 and not words[73].truncated and words[73].token_indices == (74,)
    w = words[74]
    assert (w.word, w.token_indices, w.tokens, w.truncated) == ("naïve", (75,), ("na",), True)
    assert (words[75].word, words[75].token_indices, words[75].truncated) == ("zebra", (), True)
    assert words[75].as_json() == {"word": "zebra", "token_indices": [], "tokens": [], "truncated": True}
    assert words[0].as_json() == {"word": "red", "token_indices": [1], "tokens": ["red</w>"]}
    for kw in ("naïve", "zebra"):
        with pytest.raises(ValueError, match=f"'{kw}' lies beyond the 77-token limit"):
            keyword_token_indices(tokenizer, prompt, [kw])
    assert default_keywords(tokenizer, prompt) == ["red"]
    # an occurrence past the limit does not hide the one before it
    assert keyword_token_indices(tokenizer, "a cat " + " ".join(["red"] * 80) + " cat", ["cat"]) == [(2,)]


def test_sdxl_tokenizer_pair_gives_the_same_positions(sdxl, tokenizer):
    from transformers import CLIPTokenizer
    pipe = sdxl.pipe
    bigg = CLIPTokenizer.from_pretrained(tokenizer.name_or_path, pad_token="!")  # SDXL's second tokenizer pads with "!"
    prompts = ["a café with naïve décor", "crème brûlée Привет 東京 🍕🐶 ice-cream dog's 2024",
               " ".join(["red"] * 74) + " naïve zebra"]
    for prompt in prompts:
        per_tok = [word_tokens(t, prompt, warn=False) for t in (pipe.tokenizer, pipe.tokenizer_2, bigg)]
        assert per_tok[0] == per_tok[1] == per_tok[2]
        for t in (pipe.tokenizer, pipe.tokenizer_2, bigg):  # the ids the pipeline's encoders see, at those positions
            ids = t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True).input_ids
            for w in per_tok[0]:
                assert [ids[i] for i in w.token_indices] == t.convert_tokens_to_ids(list(w.tokens))
    assert [w.word for w in word_tokens(pipe.tokenizer_2, prompts[0])] == ["a", "café", "with", "naïve", "décor"]


@pytest.mark.slow
def test_app_word_buttons_and_cli_show_words_as_typed(sd1, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from app.service import AppService
    svc = AppService(sd1, store_dir=tmp_path / "store")
    choices, kws = svc.words("a Café with naïve décor and 🐶")
    assert choices == [("a", "a"), ("Café", "Café"), ("with", "with"), ("naïve (na·ï·ve)", "naïve"),
                       ("décor (dé·cor)", "décor"), ("and", "and"), ("🐶", "🐶")]
    assert kws == ["Café", "naïve", "décor", "🐶"]
    long = svc.words(" ".join(["red"] * 80) + " zebra")[0]
    assert long == [("red", "red"), ("zebra (past the 77-token limit)", "zebra")]
    p = subprocess.run([sys.executable, "-m", "dfusion_core", "tokens", "--prompt", "a café with naïve décor"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert '"word": "naïve"' in p.stdout  # as typed, not \u-escaped
    assert [(w["word"], w["token_indices"]) for w in json.loads(p.stdout)] == [
        ("a", [1]), ("café", [2]), ("with", [3]), ("naïve", [4, 5, 6]), ("décor", [7, 8])]


def test_a_word_early_and_again_past_the_limit_is_found_early(tokenizer, sd3):
    """Issue 15: 'red' is the second word and comes back past the 77-token limit; the mask uses the early one."""
    prompt = "a red circle above a blue square " + " ".join(["and a green triangle"] * 20) + " with a red border"
    words = word_tokens(tokenizer, prompt, warn=False)
    reds = [w for w in words if w.word == "red"]
    assert [(w.token_indices, w.truncated) for w in reds] == [((2,), False), ((), True)]
    assert keyword_token_indices(tokenizer, prompt, ["red", "circle"]) == [(2,), (3,)]
    assert "red" in default_keywords(tokenizer, prompt) and "border" not in default_keywords(tokenizer, prompt)
    with pytest.raises(ValueError, match="'border' lies beyond the 77-token limit"):
        keyword_token_indices(tokenizer, prompt, ["border"])
    assert sd3.family.token_groups(sd3, prompt, ["red"])[0][0] == 2  # the MMDiT family (CLIP part) agrees
