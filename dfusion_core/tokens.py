"""Map prompt words to the token positions the text encoder sees, using the tokenizer's own offsets.

The reference release used "whitespace word index + 1" as the token index, which is wrong whenever a word
splits into several BPE tokens ("woolen" -> woo + len). Here every token is assigned to the word whose
characters it covers, so a word owns all of its tokens.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass

# Function words never chosen as default keywords (relations and articles carry no object to mask).
STOP_WORDS = frozenset("""
a an the and or of on in at to with by for from into onto over under above below left right top bottom
is are was were be been being this that these those it its his her their our your my some any each
near next beside behind front inside outside between while as than then very photo picture image
""".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


@dataclass(frozen=True)
class WordTokens:
    """One word of the prompt and the token positions (in the 77-long sequence, BOS = 0) it owns."""

    word: str
    start: int  # character offset in the prompt
    end: int
    token_indices: tuple[int, ...]
    tokens: tuple[str, ...]

    def as_json(self) -> dict:
        d = asdict(self)
        return {"word": d["word"], "token_indices": list(d["token_indices"]), "tokens": list(d["tokens"])}


def _max_length(tokenizer) -> int:
    m = getattr(tokenizer, "model_max_length", 77)
    return 77 if m is None or m > 10_000 else int(m)


def word_tokens(tokenizer, prompt: str, warn: bool = True) -> list[WordTokens]:
    """Every word of `prompt` with its token positions; words cut off by the 77-token limit get none."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    max_len = _max_length(tokenizer)
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, truncation=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # the sequence is BOS, tokens..., EOS; positions >= max_len - 1 are cut (EOS takes the last slot)
    n_content = len(ids) - 2
    kept = max_len - 2
    if n_content > kept and warn:
        warnings.warn(f"prompt has {n_content} tokens; only the first {kept} reach the text encoder "
                      f"(limit {max_len} with BOS/EOS)", stacklevel=2)
    words = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    owned: list[list[int]] = [[] for _ in words]
    names: list[list[str]] = [[] for _ in words]
    id_to_token = tokenizer.convert_ids_to_tokens
    for pos in range(1, len(ids) - 1):
        s, e = offsets[pos]
        if e <= s or pos > kept:
            continue
        for w, (_, ws, we) in enumerate(words):
            if s < we and e > ws:  # the token's characters overlap this word's
                owned[w].append(pos)
                names[w].append(id_to_token(ids[pos]))
                break
    return [WordTokens(t, s, e, tuple(o), tuple(n)) for (t, s, e), o, n in zip(words, owned, names)]


def default_keywords(tokenizer, prompt: str) -> list[str]:
    """The prompt's content words: what D-Fusion masks when the user names none."""
    out = []
    for w in word_tokens(tokenizer, prompt, warn=False):
        lw = w.word.lower()
        if w.token_indices and lw.isalnum() is not False and re.match(r"[a-z0-9]", lw) and lw not in STOP_WORDS:
            if lw not in out:
                out.append(lw)
    return out


def keyword_token_indices(tokenizer, prompt: str, keywords: list[str] | tuple[str, ...]) -> list[tuple[int, ...]]:
    """Token positions of each keyword (a word or a multi-word phrase; every occurrence in the prompt).

    A keyword absent from the prompt, or cut off by the 77-token limit, is a ValueError naming it.
    """
    words = word_tokens(tokenizer, prompt, warn=False)
    lowered = [w.word.lower() for w in words]
    result = []
    for kw in keywords:
        parts = [m.group(0).lower() for m in _WORD.finditer(kw)]
        if not parts:
            raise ValueError(f"keyword {kw!r} contains no word")
        found: list[int] = []
        for i in range(len(words) - len(parts) + 1):
            if lowered[i:i + len(parts)] == parts:
                for w in words[i:i + len(parts)]:
                    found.extend(w.token_indices)
                if not any(words[j].token_indices for j in range(i, i + len(parts))):
                    raise ValueError(f"keyword {kw!r} lies beyond the 77-token limit of the text encoder")
        if not any(lowered[i:i + len(parts)] == parts for i in range(len(words) - len(parts) + 1)):
            raise ValueError(f"keyword {kw!r} is not in the prompt {prompt!r}; "
                             f"its words are: {', '.join(w.word for w in words)}")
        result.append(tuple(sorted(set(found))))
    return result
