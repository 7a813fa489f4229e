"""Offline tokenizers: a tiny CLIP byte-level BPE and a tiny T5 Unigram, with the real families'
structure and padded lengths. The tiny demo models use them, and so do the real-size architectures
built from config files (`ConfigParts`, pipeline/models/realsize.py): config files carry no vocabulary,
and only the padded length of the token ids matters there."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTokenizer, T5TokenizerFast

# The pipelines pad or truncate prompts to these lengths, as the real tokenizers do.
TOKENIZER_MAX_LENGTH = 77
FLUX_T5_MAX_LENGTH = 512

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"

# A few merges so that common prompt words become single tokens, like in the real vocabulary;
# every other word falls back to byte-level characters, which the base vocabulary covers.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("o", "f</w>"),
    ("p", "h"),
    ("o", "t"),
    ("ph", "ot"),
    ("phot", "o</w>"),
    ("i", "r"),
    ("b", "ir"),
    ("bir", "d</w>"),
    ("a", "n</w>"),
    ("i", "n</w>"),
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte->printable-unicode table, in CLIP's vocabulary order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Same id layout as real CLIP: bytes, bytes+"</w>", merge results, then the two specials.
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _MERGES] + [_BOS, _EOS]
    return {tok: i for i, tok in enumerate(tokens)}, list(_MERGES)


def write_clip_vocab(directory: Path) -> None:
    vocab, merges = _tiny_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def make_tiny_clip_tokenizer(pad_token: str = _EOS):
    """A valid CLIPTokenizer over the tiny byte-level BPE vocabulary (vocab.json + merges.txt)."""
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
        write_clip_vocab(Path(tmp))
        tok = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=TOKENIZER_MAX_LENGTH, pad_token=pad_token
        )
    # The temp path would otherwise leak into anything that records where it came from.
    tok.name_or_path = ""
    return tok


# Whole-word pieces ("▁" marks a word start, as in SentencePiece) for prompt words: the SPair-71k
# categories, the demo's, and the template "a photo of a {category}". Any other word falls back to
# single characters; characters outside the table become <unk>, as in real T5.
_T5_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "image",
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
    "star", "blob", "tile",
)
_T5_CHARS = string.ascii_letters + string.digits + string.punctuation
_SPM_SPACE = "\u2581"  # "▁": SentencePiece's word-start mark


def make_tiny_t5_tokenizer():
    """A T5TokenizerFast with T5's structure (Unigram over SentencePiece-style pieces, Metaspace
    pre-tokenizer, "</s>" appended) over a tiny vocabulary: <pad>=0, </s>=1, <unk>=2 as in T5."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_SPM_SPACE, -2.0)]
    vocab += [(_SPM_SPACE + word, -3.0) for word in _T5_WORDS]  # a word beats any spelling of it
    vocab += [(char, -8.0) for char in _T5_CHARS]
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()  # real T5: SentencePiece's nmt_nfkc
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=_SPM_SPACE, prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement=_SPM_SPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_ids=0, model_max_length=FLUX_T5_MAX_LENGTH,
    )
    tok.name_or_path = ""
    return tok
