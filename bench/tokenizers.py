"""Tokenizers built here, offline, in the shapes real checkpoints ship: the benches and tests use them where
the embedded model's byte-level tokenizer would not show a real vocabulary's behaviour."""

import json
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]


def byte_fallback_bpe(texts: Iterable[str], vocab_size: int, prepend_scheme: str = "first") -> PreTrainedTokenizerFast:
    """Llama / Mistral's shape: a BPE over "▁"-prefixed words trained on `texts`, with the 256 byte tokens
    (<0x00>..<0xFF>) for whatever its merges do not cover, and Llama's decoder. `vocab_size` counts the
    merges' vocabulary; the byte tokens come on top of it."""
    words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = words
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                           show_progress=False))
    vocab = trained.get_vocab()
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(trained.to_str())["model"]["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = words
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
