"""Map prompt words to the token positions the text encoder sees, using the tokenizer's own offsets.

The reference release used "whitespace word index + 1" as the token index, which is wrong whenever a word
splits into several BPE tokens ("woolen" -> woo + len). Here every token is assigned to the word whose
characters it covers, so a word owns all of its tokens.

A word is what a reader sees between spaces and punctuation, in any script: a run of letters, digits and
combining marks ("café", "naïve" typed with a combining diaeresis, "東京タワー", "2024"), joined across an inner
hyphen or apostrophe ("ice-cream", "dog's") or a decimal point between digits ("1.5"); any other visible
character (punctuation, an emoji with its modifiers) is a word of its own. CLIP's byte-level BPE can cut one
character into several pieces that share its offsets, or end a piece inside the next character; words that
share a piece are joined, so every token belongs to exactly one word.
"""
from __future__ import annotations

import unicodedata
import warnings
from bisect import bisect_left
from dataclasses import dataclass

from .schema import shown

# Function words never chosen as default keywords (relations and articles carry no object to mask).
STOP_WORDS = frozenset("""
a an the and or of on in at to with by for from into onto over under above below left right top bottom
is are was were be been being this that these those it its his her their our your my some any each
near next beside behind front inside outside between while as than then very photo picture image
""".split())

_JOINERS = "-\u2010\u2011'\u2019"  # inside a word: ice-cream, dog's, dog’s
_ZWJ = "\u200d"


@dataclass(frozen=True)
class WordTokens:
    """One word of the prompt and the token positions (in the 77-long sequence, BOS = 0) it owns."""

    word: str  # as typed: the prompt's own characters
    start: int  # character offset in the prompt
    end: int
    token_indices: tuple[int, ...]  # only positions the text encoder sees (within the 77-token limit)
    tokens: tuple[str, ...]  # the BPE pieces at those positions, as the vocabulary spells them
    truncated: bool = False  # some or all of the word's tokens fall past the 77-token limit
    pieces: tuple[str, ...] = ()  # readable text of each token: the word's characters it starts ("" if none)

    @property
    def lexical(self) -> bool:
        """Letters, digits or pictographs (emoji), not punctuation alone."""
        return any(unicodedata.category(c)[0] in "LN" or unicodedata.category(c) == "So" for c in self.word)

    def as_json(self) -> dict:
        d = {"word": self.word, "token_indices": list(self.token_indices), "tokens": list(self.tokens)}
        return {**d, "truncated": True} if self.truncated else d


def _max_length(tokenizer) -> int:
    m = getattr(tokenizer, "model_max_length", 77)
    return 77 if m is None or m > 10_000 else int(m)


def _key(text: str) -> str:
    """What two spellings of a word share: composed form, case folded ("CAFE\u0301" ~ "café")."""
    return unicodedata.normalize("NFC", text).casefold()


def _attaches(text: str, j: int) -> bool:
    """Whether text[j] continues the character before it (a combining mark, emoji modifier or ZWJ sequence)."""
    c = text[j]
    return (unicodedata.category(c)[0] == "M" or c == _ZWJ or (text[j - 1] == _ZWJ and not c.isspace())
            or "\U0001F3FB" <= c <= "\U0001F3FF" or "\U000E0020" <= c <= "\U000E007F")


def _clusters(text: str) -> list[tuple[int, int]]:
    """Spans of user-perceived characters (a simplified grapheme cluster: base + marks, modifiers, flags)."""
    out, i, n = [], 0, len(text)
    while i < n:
        j = i + 1
        if not text[i].isspace():
            if "\U0001F1E6" <= text[i] <= "\U0001F1FF" and j < n and "\U0001F1E6" <= text[j] <= "\U0001F1FF":
                j += 1  # two regional indicators: one flag
            while j < n and _attaches(text, j):
                j += 1
        out.append((i, j))
        i = j
    return out


def _kind(c: str) -> str:
    """'w' letter, digit, mark or underscore (Python's \\w plus marks) | 's' space | 'p' anything else."""
    if c.isspace():
        return "s"
    return "w" if c.isalnum() or c == "_" or unicodedata.category(c)[0] == "M" else "p"


def split_words(text: str) -> list[tuple[int, int]]:
    """(start, end) of each word a reader sees in `text`, before the tokenizer is consulted."""
    cl = _clusters(text)
    kinds = [_kind(text[s]) for s, _ in cl]
    spans: list[tuple[int, int]] = []
    in_word = False
    for k, (s, e) in enumerate(cl):
        if kinds[k] == "w" and in_word:
            spans[-1] = (spans[-1][0], e)
            continue
        if kinds[k] == "p" and in_word and k + 1 < len(cl) and kinds[k + 1] == "w" and (
                text[s:e] in _JOINERS or (text[s:e] in ".," and text[s - 1].isdigit() and text[e].isdigit())):
            spans[-1] = (spans[-1][0], e)  # an inner joiner: the next letter continues this word
            continue
        if kinds[k] != "s":
            spans.append((s, e))
        in_word = kinds[k] == "w"
    return spans


def _encode(tokenizer, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    except NotImplementedError:
        raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; load the fast (tokenizers) "
                        "version of the tokenizer") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _owners(spans: list[tuple[int, int]], offsets) -> list[tuple[int, int] | None]:
    """For each token, the first and last word its characters overlap (None: it covers no word)."""
    ends = [e for _, e in spans]
    out = []
    for s, e in offsets:
        lo = bisect_left(ends, s + 1)  # the first word ending after the token starts
        hi = lo
        while hi + 1 < len(spans) and spans[hi + 1][0] < e:
            hi += 1
        out.append((lo, hi) if e > s and lo < len(spans) and spans[lo][0] < e else None)
    return out


def _join_shared(spans: list[tuple[int, int]], owners) -> tuple[list[tuple[int, int]], list[int]]:
    """Join words that share a token; returns the joined spans and each original word's joined index."""
    linked = [False] * len(spans)  # linked[i]: word i and word i + 1 share a token
    for o in owners:
        if o is not None:
            for i in range(o[0], o[1]):
                linked[i] = True
    joined, group = [], []
    for i, (s, e) in enumerate(spans):
        if i and linked[i - 1]:
            joined[-1] = (joined[-1][0], e)
        else:
            joined.append((s, e))
        group.append(len(joined) - 1)
    return joined, group


def _pieces(prompt: str, token_spans: list[tuple[int, int]]) -> tuple[str, ...]:
    """Each token's readable text: the characters it starts (byte pieces finishing a character add none)."""
    out, done = [], 0
    for s, e in token_spans:
        out.append(prompt[max(s, done):e])
        done = max(done, e)
    return tuple(out)


def word_tokens(tokenizer, prompt: str, warn: bool = True) -> list[WordTokens]:
    """Every word of `prompt`, as typed, with the token positions it owns; words (partly) past the 77-token
    limit are marked `truncated` and keep only the positions the encoder sees."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    max_len = _max_length(tokenizer)
    ids, offsets = _encode(tokenizer, prompt)
    # the sequence is BOS, tokens..., EOS; content positions past max_len - 2 are cut (EOS takes the last slot)
    n_content, kept = len(ids) - 2, max_len - 2
    if n_content > kept and warn:
        warnings.warn(f"prompt has {n_content} tokens; only the first {kept} reach the text encoder "
                      f"(limit {max_len} with BOS/EOS)", stacklevel=2)
    spans = split_words(prompt)
    owners = _owners(spans, offsets[1:len(ids) - 1])
    spans, group = _join_shared(spans, owners)
    owned: list[list[int]] = [[] for _ in spans]
    for pos, o in enumerate(owners, start=1):
        if o is not None:
            owned[group[o[0]]].append(pos)
    names = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for (s, e), pos in zip(spans, owned):
        seen = [p for p in pos if p <= kept]
        out.append(WordTokens(prompt[s:e], s, e, tuple(seen), tuple(names[p] for p in seen), len(seen) < len(pos),
                              _pieces(prompt, [(max(offsets[p][0], s), offsets[p][1]) for p in seen])))
    return out


def default_keywords(tokenizer, prompt: str) -> list[str]:
    """The prompt's content words, as typed (first spelling of each): what D-Fusion masks when the user names none."""
    out, seen = [], set()
    for w in word_tokens(tokenizer, prompt, warn=False):
        k = _key(w.word)
        if w.token_indices and not w.truncated and w.lexical and k not in STOP_WORDS and k not in seen:
            seen.add(k)
            out.append(w.word)
    return out


def keyword_token_indices(tokenizer, prompt: str, keywords: list[str] | tuple[str, ...],
                          beyond_limit_ok: bool = False) -> list[tuple[int, ...]]:
    """Token positions of each keyword (a word or a multi-word phrase; every occurrence in the prompt).

    Words match regardless of case and of how an accent was typed. Occurrences cut by the 77-token limit are
    left out; a keyword absent from the prompt, or with no occurrence within the limit, is a ValueError naming it
    (with `beyond_limit_ok`, a keyword lying wholly beyond the limit gets an empty tuple instead: another text
    encoder, such as SD3's T5, may still read it).
    """
    words = word_tokens(tokenizer, prompt, warn=False)
    keys = [_key(w.word) for w in words]
    result = []
    for kw in keywords:
        parts = [_key(kw[s:e]) for s, e in split_words(kw)]
        if not parts:
            raise ValueError(f"keyword {shown(kw)} contains no word")
        if len(parts) > 1 and _key(kw.strip()) in keys:  # signs the tokenizer joined into one word ("?!")
            parts = [_key(kw.strip())]
        n = len(parts)
        hits = [words[i:i + n] for i in range(len(words) - n + 1) if keys[i:i + n] == parts]
        if not hits:
            raise ValueError(f"keyword {shown(kw)} is not in the prompt {shown(prompt)}; "
                             f"its words are: {', '.join(w.word for w in words)}")
        usable = [h for h in hits if all(w.token_indices and not w.truncated for w in h)]
        if not usable:
            if any(w.truncated for h in hits for w in h):
                if beyond_limit_ok:
                    result.append(())
                    continue
                raise ValueError(f"keyword {shown(kw)} lies beyond the 77-token limit of the text encoder")
            raise ValueError(f"keyword {shown(kw)} has no token the text encoder sees")
        result.append(tuple(sorted({i for h in usable for w in h for i in w.token_indices})))
    return result


def keyword_positions(tokenizer, prompt: str, keywords, offset: int = 0, limit: int | None = None
                      ) -> list[tuple[int, ...]]:
    """Each keyword's token positions in a sequence of ANY tokenizer (T5 has no BOS, CLIP has one): the
    tokens whose character offsets overlap the keyword's occurrences in the prompt, shifted by `offset` (where
    that sequence starts among the text tokens) and cut at `limit` tokens. Keywords match as in
    keyword_token_indices; a keyword with no token within the limit gets an empty tuple."""
    spans = split_words(prompt)
    keys = [_key(prompt[s:e]) for s, e in spans]
    _, offsets = _encode(tokenizer, prompt)
    limit = len(offsets) if limit is None else limit
    out = []
    for kw in keywords:
        parts = [_key(kw[s:e]) for s, e in split_words(kw)]
        n = len(parts)
        chars = [(spans[i][0], spans[i + n - 1][1]) for i in range(len(spans) - n + 1) if n and keys[i:i + n] == parts]
        out.append(tuple(offset + p for p, (s, e) in enumerate(offsets[:limit])
                         if e > s and any(s < ce and e > cs for cs, ce in chars)))
    return out
