"""Incremental detokenization and stop sequences, against full decodes.

Two tokenizers: the embedded model's byte-level BPE (GPT-2 style: any id sequence is some bytes, decoded
as lossy UTF-8) and a sentencepiece-style one built here (Llama and Mistral's decoder: "▁" for spaces, byte
fallback for characters outside the vocabulary, one leading space stripped per decode). The oracle is the
text a decode of the whole sequence adds after the prompt's context.
"""

import random

import pytest
from transformers import AutoTokenizer

from bench.tokenizers import byte_fallback_bpe
from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.engine.text import (PARTIAL, PROMPT_CONTEXT, WINDOW, StreamDecoder, WindowDecoder,
                                      character_context, final_text, incremental_decoder)
from lorax_server.utils.tokens import StoppingCriteria

WORDS = ["Hello", "wörld", "naïve", "café", "日本語", "テキスト", "🙂", "👩‍🔬", "x", "the", "quick", "Ωμέγα",
         "\n", "  ", "ß"]


@pytest.fixture(scope="module")
def byte_level():
    return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A BPE over "▁"-prefixed words with byte fallback and Llama's decoder; its vocabulary holds few
    non-ASCII characters, so they go through runs of byte tokens."""
    return byte_fallback_bpe(["the quick brown fox jumps over the lazy dog", "Hello café"] * 10, 80, "always")


def expected(tokenizer, prompt, generated) -> str:
    """What the generated tokens add to a decode of the whole sequence."""
    before = tokenizer.decode(prompt, skip_special_tokens=False)
    return tokenizer.decode(prompt + generated, skip_special_tokens=False)[len(before):]


def decoders_for(tokenizer, prompt):
    """The engine's choice, and each method explicitly."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    context = character_context(decode, prompt)
    return {"chosen": incremental_decoder(tokenizer, prompt), "window": WindowDecoder(decode, context),
            "stream": StreamDecoder(tokenizer.backend_tokenizer, decode, context)}


def assert_incremental_is_full(tokenizer, prompt, generated, methods=("chosen", "window", "stream")):
    want = expected(tokenizer, prompt, generated)
    for name, decoder in decoders_for(tokenizer, prompt).items():
        if name not in methods:
            continue
        got = "".join(decoder.step(t) for t in generated)
        if want.endswith(PARTIAL):  # an unfinished character at the end is held back
            assert want.startswith(got), (name, got, want)
        else:
            assert got == want, (name, got, want)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", ", "]) for _ in range(rng.randrange(1, 30)))


@pytest.mark.parametrize("seed", range(60))
def test_random_byte_level_ids_decode_as_the_whole_sequence(byte_level, seed):
    """Any ids at all (special tokens, bytes that never form UTF-8, characters split over tokens)."""
    rng = random.Random(seed)
    vocab = len(byte_level)
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 9))]
    if byte_level.decode(prompt[-PROMPT_CONTEXT:], skip_special_tokens=False).endswith(PARTIAL):
        prompt.append(byte_level("x")["input_ids"][-1])  # tokenized prompts end on a whole character
    assert_incremental_is_full(byte_level, prompt, [rng.randrange(vocab) for _ in range(rng.randrange(1, 70))])


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("name", ["byte_level", "sentencepiece_like"])
def test_multi_byte_text_decodes_as_the_whole_sequence(name, seed, request):
    """Text with accents, CJK, emoji and ZWJ sequences, tokenized in pieces (so token boundaries fall
    anywhere a tokenizer puts them), longer than the window so that its context moves on."""
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(seed)
    texts = [random_text(rng) for _ in range(rng.randrange(1, 6))]
    ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    # a tokenized prompt ends on a whole character; the generated part may cut any run of byte tokens
    cuts = [n for n in range(1, len(ids)) if not tokenizer.decode(ids[:n]).endswith(PARTIAL)] or [len(ids)]
    cut = rng.choice(cuts)
    assert_incremental_is_full(tokenizer, ids[:cut], ids[cut:])


def test_a_leading_space_survives_the_sentencepiece_decoder(sentencepiece_like):
    """Decoded alone, "▁brown" loses its space (the decoder strips one); after the prompt's context it keeps it."""
    ids = sentencepiece_like("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert sentencepiece_like.decode(ids[2:]) == "brown fox"
    for name, decoder in decoders_for(sentencepiece_like, ids[:2]).items():
        assert "".join(decoder.step(t) for t in ids[2:]) == " brown fox", name


def test_a_character_split_over_byte_tokens_comes_with_its_last_byte(sentencepiece_like):
    prompt = sentencepiece_like("the", add_special_tokens=False)["input_ids"]
    pieces = [sentencepiece_like.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "日".encode()]
    for name, decoder in decoders_for(sentencepiece_like, prompt).items():
        assert [decoder.step(t) for t in pieces] == ["", "", "日"], name


def test_the_window_decodes_once_per_token_and_moves_on(byte_level):
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return byte_level.decode(ids, skip_special_tokens=False)

    ids = byte_level("plain words " * 20, add_special_tokens=False)["input_ids"]
    decoder = WindowDecoder(decode, ids[:3])
    text = "".join(decoder.step(t) for t in ids[3:])
    assert text == byte_level.decode(ids)[len(byte_level.decode(ids[:3])):]
    steps = len(ids) - 3
    assert max(calls) <= WINDOW and len(calls) <= 1 + steps + steps // (WINDOW - PROMPT_CONTEXT) + 1


def test_the_stream_falls_back_to_the_window_when_earlier_text_changes(sentencepiece_like):
    """Byte-fallback tokens that stop forming UTF-8 turn text already returned into replacement
    characters; DecodeStream then refuses the sequence and the window method carries on."""
    prompt = sentencepiece_like("the", add_special_tokens=False)["input_ids"]
    byte = lambda b: sentencepiece_like.convert_tokens_to_ids(f"<0x{b:02X}>")  # noqa: E731
    fox = sentencepiece_like("fox", add_special_tokens=False)["input_ids"]
    generated = [byte(b) for b in "日".encode()] + [byte(0x80)] + fox
    decoder = incremental_decoder(sentencepiece_like, prompt)
    assert isinstance(decoder, StreamDecoder)
    pieces = [decoder.step(t) for t in generated]
    assert decoder.window is not None and all(isinstance(p, str) for p in pieces)
    assert decoder.window.ids[:3] == generated[:3]  # the window starts where the stream's last text did
    assert pieces[:3] == ["", "", "日"] and "".join(pieces).endswith("fox")


def test_a_context_ending_inside_a_character_uses_the_window(sentencepiece_like):
    byte = sentencepiece_like.convert_tokens_to_ids("<0xE6>")
    assert isinstance(incremental_decoder(sentencepiece_like, [5, byte]), WindowDecoder)


def test_the_final_text_is_upstreams(byte_level):
    prompt = byte_level("A list is", add_special_tokens=False)["input_ids"]
    generated = byte_level("A list is a mutable sequence", add_special_tokens=False)["input_ids"][len(prompt):]
    assert final_text(byte_level, prompt[-1], generated) == " a mutable sequence"


# -- stop sequences over real token pieces -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece_like"])
@pytest.mark.parametrize("text, stops, ends_with", [
    ("the quick brown fox jumps over", ["brown fox"], "brown fox"),  # across several tokens
    ("café 日本語 the dog", ["日本"], "日本"),  # multi-byte characters, some over byte tokens
    ("the quick brown", ["zzz", "quick"], "quick"),  # the second of two
])
def test_a_stop_sequence_stops_where_the_text_ends_with_it(name, text, stops, ends_with, request):
    tokenizer = request.getfixturevalue(name)
    tokens_at_stop = stop_steps(tokenizer, text, stops)
    assert tokens_at_stop is not None and tokens_at_stop[1].endswith(ends_with), tokens_at_stop


def stop_steps(tokenizer, text: str, stops):
    """Feeds `text`'s tokens (after the first) through the engine's decoder and StoppingCriteria, each step
    with only its new text; returns (step, text so far) at the stop, or None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder, stopping = incremental_decoder(tokenizer, ids[:1]), StoppingCriteria(100, [-1], stops)
    out = ""
    for step, token in enumerate(ids[1:], start=1):
        new = decoder.step(token)
        out += new
        if stopping(token, new, step):
            return step, out
    return None


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece_like"])
def test_a_stop_sequence_the_text_only_passes_through_does_not_stop(name, request):
    tokenizer = request.getfixturevalue(name)
    text = "the quick brown fox jumps"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode(ids[:n + 1]) for n in range(len(ids))]
    inside = next(n for n in range(2, len(ids)) if len(pieces[n]) - len(pieces[n - 1]) >= 2)
    stop = pieces[inside - 1][-3:] + pieces[inside][len(pieces[inside - 1])]  # ends inside token `inside`
    assert stop in text and stop_steps(tokenizer, text, [stop]) is None


def test_an_empty_step_does_not_check_the_stops():
    stopping = StoppingCriteria(10, [99], ["end"])
    assert stopping(1, "the en", 1) is None
    stopping.stop_sequences = None  # any look at the stops would fail now
    assert stopping(2, "", 2) is None
