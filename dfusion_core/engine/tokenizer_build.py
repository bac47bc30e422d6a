"""Build a CLIP BPE tokenizer folder offline from the vocabulary that open_clip ships.

Stable Diffusion's tokenizer is CLIP's BPE; open_clip carries the same merges file, so a tokenizer with
identical ids can be written without any download ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges: 49,408 tokens in all


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_vocab_path() -> Path:
    import open_clip.tokenizer as oct  # imported lazily: open_clip is heavy

    return Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json loadable by CLIPTokenizer.from_pretrained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:N_MERGES + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return out


def build_t5_tokenizer(corpus: list[str], vocab_size: int = 300, model_max_length: int = 32):
    """A T5-style tokenizer (SentencePiece Unigram, metaspace, no BOS, EOS appended) trained on `corpus`:
    T5's own vocabulary is not on these machines, and this has the same shape (offsets, '▁' pieces), so the
    SD3 path with a third text encoder can be tested offline. Returns a transformers T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
