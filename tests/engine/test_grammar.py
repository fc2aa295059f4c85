"""Structured output (engine.grammar) through the batched sampler, on the CPU (and a GPU where there is one).

Random logits drive batches of constrained and free rows until every grammar finishes; each output, decoded
with its tokenizer, is valid against its schema (jsonschema), for two tokenizers: the embedded model's
byte-level BPE and a sentencepiece-style one (Llama and Mistral's "▁" words with byte fallback) built here,
each under a model vocabulary larger than the tokenizer's. Free rows choose what they choose in a batch
without grammars; a constrained row chooses what its own chooser chooses from the masked logits (the
per-request fallback); invalid schemas are refused with RequestError; compiled schemas are cached.
"""

import json
import random
from dataclasses import dataclass, field, replace
from typing import List, Optional

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bench.tokenizers import byte_fallback_bpe
from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.engine.grammar import GrammarCompiler, GrammarState, host_bitmask, mask_logits
from lorax_server.engine.sampler import BatchSampler
from lorax_server.utils.errors import RequestError
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams
from tests.engine.test_sampler import counted_syncs

EOS = 2
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEP_LIMIT = 400  # every schema below bounds its strings, numbers and arrays: outputs end well before

SCHEMAS = {
    "nested_person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 16},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "ok": {"type": "boolean"},
            "nothing": {"type": "null"},
            "kind": {"const": "shirt"},
        },
        "required": ["color", "size", "ok", "kind"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "big": {"type": "integer", "minimum": 1000, "maximum": 99999},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "temp": {"type": "number", "exclusiveMinimum": -40, "exclusiveMaximum": 60},
        },
        "required": ["count", "big", "ratio", "temp"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "done": {"type": "boolean"}},
            "required": ["id", "done"],
            "additionalProperties": False,
        },
        "minItems": 2,
        "maxItems": 4,
    },
    "tool_call": {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "pattern": "^[A-Z][a-z]{2,10}$"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
    "patterns_and_matrix": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]$"},
            "matrix": {"type": "array", "minItems": 1, "maxItems": 3,
                       "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                 "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
        },
        "required": ["sku", "date", "matrix"],
        "additionalProperties": False,
    },
    "many_optional": {
        "type": "object",
        "properties": {f"field_{i}": ({"type": "integer", "minimum": 0, "maximum": 100} if i % 3 == 0 else
                                      {"type": "boolean"} if i % 3 == 1 else {"type": "string", "maxLength": 6})
                       for i in range(12)},
        "required": [f"field_{i}" for i in range(0, 12, 2)],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                           {"type": "string", "maxLength": 4}, {"type": "null"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
}

# Sampling controls of the constrained rows: the mask comes before every one of them.
PARAMS = [
    SamplingParams(),
    SamplingParams(do_sample=True, seed=1),
    SamplingParams(temperature=0.7, top_k=20, seed=2),
    SamplingParams(top_p=0.9, repetition_penalty=1.3, seed=3, return_k_alternatives=2),
    SamplingParams(do_sample=True, seed=4, frequency_penalty=0.5, presence_penalty=0.3, watermark=True),
    SamplingParams(typical_p=0.8, seed=5),
]


@dataclass
class Row:
    """The fields of the engine's Request that the sampler reads."""

    chooser: NextTokenChooser
    tokens: List[int]
    grammar: Optional[GrammarState] = None
    counts: Optional[torch.Tensor] = None
    generated: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    logits_gen: torch.Generator = None  # this row's logits stream, the same in any batch


def make_row(params: SamplingParams, grammar: Optional[GrammarState], stream: int, device="cpu") -> Row:
    return Row(NextTokenChooser(params, device), [1, 5, 9], grammar, logits_gen=torch.Generator().manual_seed(stream))


def row_logits(rows: List[Row], vocab: int, device="cpu") -> torch.Tensor:
    return torch.stack([torch.randn(vocab, generator=r.logits_gen) * 3 for r in rows]).to(device)  # [B, V]


def drive(sampler: BatchSampler, rows: List[Row], vocab: int, steps: Optional[int] = None) -> None:
    """Steps the batch `steps` times, or (None) until no grammar is left unfinished, at most STEP_LIMIT
    times; a row whose grammar finished leaves the batch (as the engine ends that request)."""
    live = list(rows)
    for _ in range(STEP_LIMIT if steps is None else steps):
        if not live or steps is None and all(r.grammar is None for r in live):
            break
        choices = sampler.step(row_logits(live, vocab, sampler.device), live)
        for r, c in zip(live, choices):
            assert c.error is None, c.error
            r.tokens.append(c.token)
            r.generated.append(c.token)
            r.logprobs.append(c.logprob)
        live = [r for r in live if r.grammar is None or not r.grammar.finished]


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A BPE over "▁"-prefixed words of Python's documentation, with byte fallback and Llama's decoder."""
    import pydoc_data.topics

    return byte_fallback_bpe(list(pydoc_data.topics.topics.values()), 1500)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_style"])
def compiler(request):
    """The tokenizer's compiler, for a model vocabulary 64 ids past the tokenizer's (padded checkpoints)."""
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR)) if request.param == "byte_level" \
        else sentencepiece_style()
    assert tokenizer.eos_token_id == EOS
    return GrammarCompiler(tokenizer, len(tokenizer) + 64, [EOS])


def decoded(compiler: GrammarCompiler, row: Row) -> str:
    """The output's text; a finished grammar's output ends where the JSON does, or with EOS where the JSON
    could have gone on (a top-level number)."""
    ids = row.generated[:-1] if row.generated[-1] == EOS else row.generated
    assert EOS not in ids, row.generated
    return compiler.tokenizer.decode(ids)


# -- valid outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_every_output_is_valid_against_its_schema(compiler, seed, device):
    """Every schema under every sampling control, in one batch with free rows, over random logits: each
    grammar finishes, and its text parses as JSON valid against its schema."""
    vocab = compiler.vocab_size
    rng = random.Random(seed)
    constrained = [make_row(replace(rng.choice(PARAMS), seed=rng.randrange(2**32)), compiler.state(json.dumps(s)),
                            stream=1000 * seed + i, device=device) for i, s in enumerate(SCHEMAS.values())]
    free = [make_row(SamplingParams(do_sample=True, seed=seed), None, stream=1000 * seed + 500, device=device)]
    batch = constrained[:4] + free + constrained[4:]
    drive(BatchSampler(device), batch, vocab)
    for name, row in zip(SCHEMAS, constrained):
        assert row.grammar.finished, f"{name} did not finish in {STEP_LIMIT} steps"
        assert max(row.generated) < len(compiler.tokenizer), "a padding id past the tokenizer was chosen"
        text = decoded(compiler, row)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_a_finished_grammar_allows_only_eos_and_eos_ends_it(compiler):
    state = compiler.state(json.dumps({"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}))
    for token in compiler.ll_tokenizer.tokenize_str('{"a": 1}'):
        assert not state.finished
        assert state.accept(token)
    assert state.finished  # the text is complete: only EOS may follow
    allowed = torch.isfinite(state.masked(torch.zeros(compiler.vocab_size))).nonzero().flatten().tolist()
    assert allowed == [EOS]
    assert state.accept(EOS) and state.finished and state.error is None


def test_every_eos_id_of_the_model_ends_the_output():
    """A model with several EOS ids (a chat model's end-of-turn beside </s>): each is allowed at the end,
    none before."""
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    end_of_turn = tokenizer.convert_tokens_to_ids("<unk>")
    state = GrammarCompiler(tokenizer, len(tokenizer), [EOS, end_of_turn]).state('{"const": true}')
    assert not torch.isfinite(state.masked(torch.zeros(len(tokenizer))))[[EOS, end_of_turn]].any()
    for token in tokenizer("true", add_special_tokens=False)["input_ids"]:
        assert state.accept(token)
    assert torch.isfinite(state.masked(torch.zeros(len(tokenizer)))).nonzero().flatten().tolist() == [end_of_turn, EOS]


def test_a_number_that_may_go_on_ends_when_eos_is_chosen(compiler):
    """A top-level integer is complete after each digit, so EOS is one of the allowed tokens, not the only one."""
    state = compiler.state(json.dumps({"type": "integer", "minimum": 0, "maximum": 999}))
    assert state.accept(compiler.ll_tokenizer.tokenize_str("1")[0])
    allowed = torch.isfinite(state.masked(torch.zeros(compiler.vocab_size)))
    assert allowed[EOS] and allowed.sum() > 1 and not state.finished
    assert state.accept(EOS) and state.finished


# -- mixed batches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_free_rows_choose_what_they_choose_without_grammars(compiler, device):
    """The same free rows (seeds, logits streams) with and without constrained rows beside them: the same
    tokens and log-probabilities, step for step."""
    vocab = compiler.vocab_size
    free_params = [SamplingParams(), SamplingParams(do_sample=True, seed=7, top_k=50),
                   SamplingParams(temperature=0.8, seed=9, repetition_penalty=1.2, return_k_alternatives=3)]

    def free_rows():
        return [make_row(p, None, stream=100 + i, device=device) for i, p in enumerate(free_params)]

    alone = free_rows()
    mixed_free = free_rows()
    constrained = [make_row(p, compiler.state(json.dumps(s)), stream=200 + i, device=device)
                   for i, (p, s) in enumerate(zip(PARAMS, SCHEMAS.values()))]
    mixed = [constrained[0], mixed_free[0], *constrained[1:3], mixed_free[1], mixed_free[2], *constrained[3:]]
    steps = 60
    drive(BatchSampler(device), mixed, vocab, steps)
    drive(BatchSampler(device), alone, vocab, steps)
    for a, b in zip(alone, mixed_free):
        assert a.generated == b.generated
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    assert all(len(r.generated) == steps for r in alone)


def test_a_constrained_row_chooses_what_its_own_chooser_chooses_from_the_masked_logits(compiler):
    """The per-request fallback (the engine's sample_alone): state.masked(logits) into the row's own chooser,
    then accept; the batched step chooses the same tokens with the same log-probabilities."""
    vocab = compiler.vocab_size
    schemas = [json.dumps(s) for s in SCHEMAS.values()]
    batched = [make_row(p, compiler.state(s), stream=300 + i) for i, (p, s) in enumerate(zip(PARAMS, schemas))]
    alone = [make_row(p, compiler.state(s), stream=300 + i) for i, (p, s) in enumerate(zip(PARAMS, schemas))]
    sampler = BatchSampler("cpu")
    for step in range(40):
        logits = row_logits(batched, vocab)
        for r in alone:  # the same logits stream
            torch.randn(vocab, generator=r.logits_gen)
        choices = sampler.step(logits, batched)
        for i, (b, a, choice) in enumerate(zip(batched, alone, choices)):
            if a.grammar.finished:  # it ended the step before (the engine would have ended the request)
                continue
            token, logprob, _ = a.chooser(a.grammar.masked(logits[i]), a.tokens)
            assert (choice.token, choice.logprob) == pytest.approx((token, logprob), abs=1e-5), f"step {step} row {i}"
            assert a.grammar.accept(token)
            for r in (a, b):
                r.tokens.append(token)


def test_masks_filled_in_parallel_are_the_ones_filled_one_by_one(compiler):
    """llguidance's thread pool and the plain loop write the same bitmask, rows in any order."""
    vocab = compiler.vocab_size
    rows = [make_row(PARAMS[i % len(PARAMS)], compiler.state(json.dumps(s)), stream=400 + i)
            for i, s in enumerate(list(SCHEMAS.values()) * 2)]
    drive(BatchSampler("cpu"), rows, vocab, 7)  # states part-way through their outputs
    placed = [(2 * i + 1, r.grammar) for i, r in enumerate(rows)]
    one_by_one = host_bitmask(2 * len(rows) + 1, placed, threads=1)
    parallel = host_bitmask(2 * len(rows) + 1, placed, threads=2)
    assert torch.equal(one_by_one, parallel)
    assert (one_by_one[0::2] == -1).all()  # free rows: everything allowed


def test_a_padded_vocabulary_never_allows_the_padding():
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    compiler = GrammarCompiler(tokenizer, len(tokenizer) + 100, [EOS])
    state = compiler.state('{"type": "string"}')
    state.accept(tokenizer.convert_tokens_to_ids('"'))
    allowed = torch.isfinite(mask_logits(torch.zeros(1, len(tokenizer) + 100), [(0, state)])[0])
    assert allowed[:len(tokenizer)].sum() > 100 and not allowed[len(tokenizer):].any()
    wider = torch.isfinite(mask_logits(torch.zeros(1, len(tokenizer) + 300), [(0, state)])[0])  # logits wider still
    assert torch.equal(wider[:len(tokenizer) + 100], allowed) and not wider[len(tokenizer):].any()


# -- the sampler's contract with constrained rows ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["greedy", "everything"])
def test_a_constrained_step_synchronises_once_and_leaves_the_logits_alone(compiler, mix, device, monkeypatch):
    """The masks reach the device in a queued copy: still one host synchronisation per step (on a GPU any
    other one raises), and the logits (a CUDA graph's output buffer) are not written."""
    vocab = compiler.vocab_size
    params = [SamplingParams()] * 6 if mix == "greedy" else PARAMS
    rows = [make_row(p, compiler.state(json.dumps(s)) if i % 2 else None, stream=500 + i, device=device)
            for i, (p, s) in enumerate(zip(params, SCHEMAS.values()))]
    sampler = BatchSampler(device)
    for _ in range(2):
        logits = row_logits(rows, vocab, device)
        before = logits.clone()
        with counted_syncs(monkeypatch) as calls:
            choices = sampler.step(logits, rows)
        assert calls == {"tolist": 1}, calls
        assert torch.equal(logits, before)
        for r, c in zip(rows, choices):
            r.tokens.append(c.token)


def test_a_row_whose_grammar_failed_ends_alone_with_the_reason(compiler):
    state = compiler.state(json.dumps({"type": "boolean"}))
    assert not state.accept(compiler.tokenizer.convert_tokens_to_ids("<s>"))  # not JSON
    assert state.error and not state.finished
    rows = [make_row(SamplingParams(), None, stream=1), make_row(SamplingParams(), state, stream=2)]
    free, failed = BatchSampler("cpu").step(row_logits(rows, compiler.vocab_size), rows)
    assert free.error is None
    assert failed.error == state.error and "JSON schema" in failed.error


# -- compiling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema, says", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "must be an object"),
    ("3", "must be an object"),
    ('{"type": "strin"}', "strin"),
    ('{"type": "string", "pattern": "[unclosed"}', "unclosed"),
    ('{"type": "integer", "minimum": 5, "maximum": 1}', "minimum"),
    ('{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}', "nope"),
    ('{"type": "array", "uniqueItems": true}', "uniqueItems"),  # not enforced, so refused
    ('{"$ref": "#"}', "cannot be served: the output left its JSON schema"),  # compiles, fails at its first mask
    ("[" * 5000 + "]" * 5000, "nests too deeply"),
])
def test_an_invalid_schema_is_refused_with_the_reason(compiler, schema, says):
    with pytest.raises(RequestError, match=None) as raised:
        compiler.compile(schema)
    assert says in str(raised.value)
    assert schema not in compiler.cache


def test_true_is_the_schema_of_any_json(compiler):
    state = compiler.state("true")
    assert state.accept(compiler.ll_tokenizer.tokenize_str("[")[0])


def test_a_schema_compiles_once_and_the_cache_is_bounded():
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [EOS], cache_size=2)
    a, b, c = (json.dumps(s) for s in list(SCHEMAS.values())[:3])
    first = compiler.compile(a)
    assert compiler.compile(a) is first and (compiler.hits, compiler.misses) == (1, 1)
    one, other = compiler.state(a), compiler.state(a)  # each request has its own state
    assert one.accept(tokenizer.convert_tokens_to_ids("{")) and not one.finished
    assert torch.equal(host_bitmask(1, [(0, other)]), host_bitmask(1, [(0, compiler.state(a))]))
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recently used
    compiler.compile(c)  # evicts b
    assert list(compiler.cache) == [a, c]
    misses = compiler.misses
    compiler.compile(b)
    assert compiler.misses == misses + 1
