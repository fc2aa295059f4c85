"""The engine's choose step with the batched sampler, on the embedded tiny Mixtral (fp32, CPU).

One scenario mixes every sampling control over two batches that prefill, decode, concatenate and filter.
Run with the batched sampler and run with each request's own chooser (the oracle; the engine's fallback
when a batched step raises), it gives the same tokens, log-probabilities, alternatives and texts; after
every step, each penalised request's device counts are its own sequence's. A request whose logits turn
NaN ends alone while its batch-mates produce what they produce without it.
"""

import math
from typing import Dict, List

import pytest
import torch

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.engine.runner import ModelRunner
from lorax_server.engine.sampler import NON_FINITE, BatchSampler
from lorax_server.models import get_model
from lorax_server.models.flash_causal_lm import FlashCausalLM
from lorax_server.utils.tokens import SamplingParams

PARAMS = {
    1: SamplingParams(do_sample=True, seed=5, temperature=0.8, top_k=20, repetition_penalty=1.3,
                      return_k_alternatives=2),
    2: SamplingParams(),
    3: SamplingParams(seed=0, top_p=0.9, typical_p=0.95, frequency_penalty=0.5, presence_penalty=0.4, watermark=True),
    4: SamplingParams(do_sample=True, seed=2**64 - 1, presence_penalty=-0.5),
    5: SamplingParams(repetition_penalty=1.5, return_k_alternatives=3),  # greedy, penalised
    6: SamplingParams(do_sample=True, seed=9, temperature=1.4),
    7: SamplingParams(top_k=5, seed=1, watermark=True, frequency_penalty=1.0),
}
PROMPTS = {1: "The for statement", 2: "A list is", 3: "def f(x):", 4: "Exceptions are", 5: "import os\n",
           6: "The café", 7: "while True:"}
NEW = {1: 12, 2: 9, 3: 10, 4: 14, 5: 8, 6: 11, 7: 13}


@pytest.fixture(scope="module")
def engine():
    return get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=4 << 20)


def assert_counts_are_the_sequences(engine: FlashCausalLM):
    """Each request's penalty counts are its sequence's, and the token a step launched ahead chose for it."""
    vocab = engine.config.vocab_size
    engine.steps_ahead.collect()
    for batch in engine.batches.values():
        for r in batch.requests:
            if r.counts is not None:
                ahead = [r.ahead.token] if r.ahead is not None else []
                want = torch.bincount(torch.tensor(r.seq.tokens + ahead), minlength=vocab).float()
                assert torch.equal(r.counts.cpu(), want), f"request {r.id}'s counts are not its sequence's"


def scenario(engine: FlashCausalLM) -> Dict[int, List]:
    """Every request's steps as (token, logprob, alternatives, text) and its end, through prefill, decode,
    concatenate (Decode of two batches) and filter (three requests leave, the rest in another order)."""
    out: Dict[int, List] = {}

    def record(results):
        for res in results:
            alternatives = [(t, round(lp, 4), text) for t, lp, text in res.token.alternatives]
            out.setdefault(res.request_id, []).append((res.token.id, res.token.logprob, alternatives, res.token.text))
            if res.finish_reason:
                out[res.request_id].append((res.finish_reason, res.text, res.error))
        assert_counts_are_the_sequences(engine)

    def request(i):
        ids = engine.tokenize(PROMPTS[i], [], 0)
        return engine.new_request(i, ids, PARAMS[i], NEW[i], ignore_eos=True)

    engine.clear()
    results, _ = engine.prefill(101, [request(i) for i in (1, 2, 3, 4)])
    record(results)
    for _ in range(2):
        record(engine.decode([101])[0])
    record(engine.prefill(102, [request(i) for i in (5, 6, 7)])[0])
    record(engine.decode([101, 102])[0])
    live = engine.live_request_ids()
    engine.filter(101, [i for i in (6, 1, 7, 4) if i in live])
    batch = engine.batches.get(101)
    while batch is not None:
        results, batch = engine.decode([101])
        record(results)
    return out


def assert_same_runs(got: Dict[int, List], want: Dict[int, List], skip=()):
    assert got.keys() == want.keys()
    for rid in want:
        if rid in skip:
            continue
        assert len(got[rid]) == len(want[rid]), rid
        for step, (g, w) in enumerate(zip(got[rid], want[rid])):
            if len(w) == 3:  # the end: reason, text, error
                assert g == w, (rid, step)
                continue
            assert (g[0], g[2], g[3]) == (w[0], w[2], w[3]), (rid, step)
            assert g[1] == pytest.approx(w[1], abs=1e-5), (rid, step)


@pytest.fixture(scope="module")
def batched(engine):
    return scenario(engine)


def test_the_scenario_samples_and_stops(batched):
    """It exercises what it claims: sampled requests differ from greedy, filtered requests never end."""
    assert all(batched[rid][-1][0] == "length" for rid in (1, 4, 6, 7))
    assert all(len(batched[rid][-1]) == 4 for rid in (2, 3, 5))  # filtered out before their end
    assert all(len(batched[rid]) == NEW[rid] + 1 for rid in (1, 4, 6, 7))


def test_each_request_alone_gives_what_the_batch_gives(engine, batched, monkeypatch):
    """A batched step that raises hands every request to its own chooser, which is the oracle."""
    def refuse(self, logits, rows):
        raise RuntimeError("no batched sampling in this test")

    monkeypatch.setattr(BatchSampler, "launch", refuse)
    assert_same_runs(scenario(engine), batched)


def test_a_request_whose_logits_turn_nan_ends_alone(engine, batched, monkeypatch):
    real = ModelRunner.forward
    broken = {"done": False}
    prompt_6 = engine.tokenize(PROMPTS[6], [], 0)

    def forward(self, seqs, counts, prefill, all_logits=False):
        logits = real(self, seqs, counts, prefill, all_logits)
        ids = [6 if s.tokens[:len(prompt_6)] == prompt_6 else None for s in seqs]  # its first decode step
        if not prefill and 6 in ids and not broken["done"]:
            broken["done"] = True
            logits = logits.clone()
            logits[ids.index(6), 3] = math.nan
        return logits

    monkeypatch.setattr(ModelRunner, "forward", forward)
    got = scenario(engine)
    assert broken["done"]
    assert len(got[6]) == 3  # its first token, then the error's token (no logprob) and its end
    assert math.isnan(got[6][1][1]) and got[6][2] == ("error", "", f"request 6: {NON_FINITE}")
    assert_same_runs(got, batched, skip={6})
    assert not engine.batches  # every request ended; the failed one's blocks went back with the rest


def test_steps_launched_ahead_choose_what_steps_launched_in_turn_choose(engine, batched, monkeypatch):
    """The scenario (prefill, concatenate, filter, seeds, penalties, watermark) gives the same tokens when
    every decode step waits for its Decode call; and with steps launched ahead, one was in flight."""
    assert engine.decode_ahead
    request = engine.new_request(1, engine.tokenize(PROMPTS[1], [], 0), PARAMS[1], 4, ignore_eos=True)
    engine.prefill(201, [request])
    assert len(engine.steps_ahead.pending) == 1 and engine.steps_ahead.pending[0].requests == [request]
    engine.clear()
    assert not engine.steps_ahead.pending
    monkeypatch.setattr(engine, "decode_ahead", False)
    assert_same_runs(scenario(engine), batched)


def test_steady_decode_steps_follow_on_the_device(engine, monkeypatch):
    """Decode calls on the same batch launch each step from the tokens the previous step chose on the device,
    before reading them; a watermarked request (its green list reads the token on the host) stops that."""
    fed = []
    real = ModelRunner.forward

    def forward(self, seqs, counts, prefill, all_logits=False, input_ids=None):
        fed.append(input_ids is not None)
        return real(self, seqs, counts, prefill, all_logits, input_ids)

    monkeypatch.setattr(ModelRunner, "forward", forward)
    engine.clear()
    requests = [engine.new_request(i, engine.tokenize(PROMPTS[i], [], 0), PARAMS[i], 6, ignore_eos=True)
                for i in (1, 2, 4)]
    _, batch = engine.prefill(301, requests)
    for _ in range(3):
        _, batch = engine.decode([batch.id])
    assert fed == [False, False, True, True, True]  # prefill, its step ahead (host), then each step follows
    # A batch joins (Decode of both, as the router concatenates) and one request is cancelled (FilterBatch):
    # every request still has its step in flight, so each step still follows on the device.
    fed.clear()
    joining = [engine.new_request(i, engine.tokenize(PROMPTS[i], [], 0), PARAMS[i], 6, ignore_eos=True)
               for i in (5, 6)]
    _, new = engine.prefill(303, joining)
    _, batch = engine.decode([batch.id, new.id])
    batch = engine.filter(batch.id, [r.id for r in batch.requests if r.id != 2])
    _, batch = engine.decode([batch.id])
    assert fed == [False, False, True, True]  # the new batch's prefill and its step ahead, then followed twice
    fed.clear()
    engine.clear()
    _, batch = engine.prefill(302, [engine.new_request(7, engine.tokenize(PROMPTS[7], [], 0), PARAMS[7], 6)])
    engine.decode([batch.id])
    assert fed == [False, False, False]  # watermarked: each step waits for its token on the host
    engine.clear()


def test_steps_are_launched_ahead_by_default_on_a_gpu_only(monkeypatch):
    from lorax_server.models.flash_causal_lm import decode_ahead_default

    monkeypatch.delenv("LORAX_DECODE_AHEAD")
    assert decode_ahead_default(torch.device("cuda")) and not decode_ahead_default(torch.device("cpu"))
    monkeypatch.setenv("LORAX_DECODE_AHEAD", "1")
    assert decode_ahead_default(torch.device("cpu"))
    monkeypatch.setenv("LORAX_DECODE_AHEAD", "0")
    assert not decode_ahead_default(torch.device("cuda"))


def test_a_constrained_request_follows_on_the_device_and_samples_once_its_grammar_took_the_token(engine,
                                                                                               monkeypatch):
    """With a JSON-schema request in the batch, each step's forward pass is still launched from the tokens the
    step before chose on the device, before they are read; its sampling waits until the grammar took them.
    The tokens, texts and ends are those of steps launched in turn, and the JSON is valid."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["a", "bc"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    fed = []  # per forward pass: (fed from the device, its rows)
    real = ModelRunner.forward

    def forward(self, seqs, counts, prefill, all_logits=False, input_ids=None):
        fed.append((input_ids is not None, len(seqs)))
        return real(self, seqs, counts, prefill, all_logits, input_ids)

    def run() -> Dict[int, List]:
        engine.clear()
        requests = [engine.new_request(1, engine.tokenize(PROMPTS[2], [], 0), SamplingParams(), 40,
                                       schema=json.dumps(schema)),
                    engine.new_request(2, engine.tokenize(PROMPTS[1], [], 0), PARAMS[1], 10, ignore_eos=True),
                    engine.new_request(3, engine.tokenize(PROMPTS[6], [], 0), PARAMS[6], 10, ignore_eos=True)]
        out: Dict[int, List] = {}
        results, batch = engine.prefill(401, requests)
        while True:
            for res in results:
                out.setdefault(res.request_id, []).append((res.token.id, res.token.text, res.finish_reason))
                if res.finish_reason:
                    out[res.request_id].append(res.text)
            if batch is None:
                return out
            results, batch = engine.decode([batch.id])

    monkeypatch.setattr(ModelRunner, "forward", forward)
    ahead = run()
    # every forward pass after the first two (the prefill, its step ahead launched from the host) followed on
    # the device, five or more of them with all three requests, the constrained one included
    assert all(from_device for from_device, _ in fed[2:]) and fed[2:7] == [(True, 3)] * 5, fed
    jsonschema.validate(json.loads(ahead[1][-1]), schema)
    assert ahead[1][-2][2] == "eos" and len(ahead[2]) == len(ahead[3]) == 11
    monkeypatch.setattr(engine, "decode_ahead", False)
    fed.clear()
    assert run() == ahead and not any(from_device for from_device, _ in fed)
    engine.clear()


@pytest.mark.parametrize("fail_at", [3, 5])
def test_a_failed_read_beside_a_constrained_request_keeps_the_penalty_counts(engine, monkeypatch, fail_at):
    """A batched read that fails hands its requests to their own choosers, which drop the penalty counts; the
    step already launched (forward pass first, sampling after the read, for the grammar) must then not rebuild
    them from a sequence still without the token just chosen: the penalised request's tokens are those of steps
    launched in turn."""
    import json

    from lorax_server.engine.sampler import LaunchedStep

    schema = json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 40}},
                         "required": ["s"]})

    def run(fail: bool) -> Dict[int, List[int]]:
        engine.clear()
        requests = [engine.new_request(1, engine.tokenize(PROMPTS[1], [], 0), SamplingParams(), 30, schema=schema),
                    engine.new_request(3, engine.tokenize(PROMPTS[3], [], 0), SamplingParams(frequency_penalty=0.5),
                                       30, ignore_eos=True)]
        reads = {"n": 0}
        real = LaunchedStep.collect

        def collect(self):
            reads["n"] += 1
            if fail and reads["n"] == fail_at:
                raise RuntimeError("a failed read, for this test")
            return real(self)

        monkeypatch.setattr(LaunchedStep, "collect", collect)
        out: Dict[int, List[int]] = {}
        results, batch = engine.prefill(501, requests)
        while True:
            for res in results:
                out.setdefault(res.request_id, []).append(res.token.id)
            if batch is None:
                return out
            results, batch = engine.decode([batch.id])

    monkeypatch.setattr(engine, "decode_ahead", False)
    in_turn = run(fail=False)
    monkeypatch.setattr(engine, "decode_ahead", True)
    assert run(fail=True)[3] == in_turn[3]
    engine.clear()


@pytest.mark.parametrize("fail_at", [2, 4])
def test_after_a_failed_read_the_cache_holds_the_tokens_the_requests_report(engine, monkeypatch, fail_at):
    """A read that fails falls back to each request's own chooser, which may draw another token than the device
    did; the step launched from the device's tokens before the read is then taken back and run again from the
    host's. Sampled requests' reported log-probabilities equal those of one prefill over their prompt and
    output (a cache that saw other tokens would put them nats apart)."""
    from lorax_server.engine.sampler import LaunchedStep

    real = LaunchedStep.collect
    reads = {"n": 0}

    def collect(self):
        reads["n"] += 1
        if reads["n"] == fail_at:
            raise RuntimeError("a failed read, for this test")
        return real(self)

    monkeypatch.setattr(LaunchedStep, "collect", collect)
    engine.clear()
    prompts = {i: engine.tokenize(PROMPTS[i], [], 0) for i in (1, 2)}
    requests = [engine.new_request(i, ids, SamplingParams(do_sample=True, seed=i), 10, ignore_eos=True)
                for i, ids in prompts.items()]
    steps: Dict[int, List] = {}
    results, batch = engine.prefill(601, requests)
    while True:
        for res in results:
            steps.setdefault(res.request_id, []).append((res.token.id, res.token.logprob))
        if batch is None:
            break
        results, batch = engine.decode([batch.id])
    assert reads["n"] > fail_at
    monkeypatch.setattr(LaunchedStep, "collect", real)
    for i, chosen in steps.items():
        engine.clear()
        replay = engine.new_request(700 + i, prompts[i] + [t for t, _ in chosen], SamplingParams(), 1,
                                    ignore_eos=True, prefill_logprobs=True)
        prompt_tokens = engine.prefill(602 + i, [replay])[0][0].prompt_tokens
        want = [p.logprob for p in prompt_tokens][-len(chosen):]
        assert [lp for _, lp in chosen] == pytest.approx(want, abs=1e-4), i
    engine.clear()
