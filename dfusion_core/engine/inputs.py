"""The rules for what a user types as seeds and prompts: one for the CLI, the app and stored pairs. Apart from
the sampler so that a face checks them before it imports torch or loads a model."""
from __future__ import annotations

from .schema import shown

MAX_SEED = 2 ** 31 - 1  # seeds are integers in 0..MAX_SEED: the one range of the CLI, the app and stored pairs


def check_seed(seed, name: str = "a seed") -> int:
    """The seed rule every face uses: an integer in 0..MAX_SEED (fits a widget's int32 and any RNG)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed <= MAX_SEED):
        raise ValueError(f"{name} must be an integer in 0..{MAX_SEED}, got {shown(seed)}")
    return seed


def check_pair_seeds(base_seed, ref_seed) -> tuple[int, int]:
    """A fused pair's seeds: each in range, and two different images (equal seeds give the same image twice)."""
    b, r = check_seed(base_seed, "the base seed"), check_seed(ref_seed, "the reference seed")
    if b == r:
        raise ValueError(f"base and reference are the same seed ({b}): a pair needs two different images")
    return b, r


MAX_PROMPT_CHARS = 1000


def validate_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: type what the image should show")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS} "
                         "(the text encoder reads at most 77 tokens anyway)")
    return prompt
