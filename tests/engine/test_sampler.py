"""The batched sampler against the per-request oracle (`NextTokenChooser`), row by row.

On random logits and ragged mixes of every control (greedy and sampled rows, seeds, temperature, top-k,
top-p, typical-p, penalties, watermark, alternatives), over several steps, the batched step chooses the
oracle's tokens (seeded draws included) with the oracle's log-probabilities (1e-5). Then: the device
counts after rows leave, are reordered and join (as filter and concatenate move requests), non-finite
rows ending alone, one host synchronisation per step, and the greedy short path. On a GPU every test
also runs on the device (and the sync is checked with torch.cuda.set_sync_debug_mode).
"""

import contextlib
import math
import random
from dataclasses import dataclass, field, replace
from typing import List, Optional

import pytest
import torch

from lorax_server.engine.sampler import NON_FINITE, BatchSampler, race
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class Row:
    """What the engine's Request gives the sampler."""

    chooser: NextTokenChooser
    tokens: List[int]
    counts: Optional[torch.Tensor] = None
    oracle: NextTokenChooser = field(default=None)  # the same parameters and seed, its own generator


def make_row(params: SamplingParams, tokens: List[int], device) -> Row:
    chooser = NextTokenChooser(params, device)  # without a seed it draws one: the oracle takes the same
    return Row(chooser, list(tokens), oracle=NextTokenChooser(replace(params, seed=chooser.seed), device))


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    """One request's parameters: each control on or off at random, at values that filter something."""
    on = lambda p: rng.random() < p  # noqa: E731
    return SamplingParams(
        temperature=rng.choice([0.0, 1.0, 0.3, 0.7, 1.3, 2.0]) if on(0.5) else 1.0,
        top_k=rng.choice([1, 2, 5, 20, vocab - 1, vocab, vocab + 7]) if on(0.4) else 0,
        top_p=rng.choice([0.1, 0.5, 0.8, 0.95, 1.0]) if on(0.4) else 1.0,
        typical_p=rng.choice([0.2, 0.5, 0.9, 1.0]) if on(0.3) else 1.0,
        do_sample=on(0.4),
        seed=rng.choice([0, 1, 42, 2**32 + 5, 2**64 - 1, rng.randrange(2**63)]),
        repetition_penalty=rng.choice([0.5, 1.3, 2.0]) if on(0.3) else 1.0,
        frequency_penalty=rng.choice([-0.5, 0.3, 1.0]) if on(0.3) else 0.0,
        presence_penalty=rng.choice([-1.0, 0.2, 0.9]) if on(0.3) else 0.0,
        return_k_alternatives=rng.choice([0, 0, 1, 3, vocab + 2]),
        watermark=on(0.15),
    )


def oracle_choice(row: Row, logits: torch.Tensor):
    return row.oracle(logits, row.tokens)


def assert_same(choice, expected, where: str):
    token, logprob, alternatives = expected
    assert choice.error is None, where
    assert choice.token == token, f"{where}: token {choice.token} != oracle's {token}"
    assert choice.logprob == pytest.approx(logprob, abs=1e-5), where
    assert len(choice.alternatives) == len(alternatives), where
    # Alternatives at -inf (filtered tokens) tie: which ids the two topk calls list among them may differ.
    finite = [(t, lp) for t, lp in alternatives if math.isfinite(lp)]
    got = [(t, lp) for t, lp in choice.alternatives if math.isfinite(lp)]
    assert [t for t, _ in got] == [t for t, _ in finite], where
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in finite], abs=1e-5), where


def run_steps(sampler: BatchSampler, rows: List[Row], vocab: int, steps: int, gen: torch.Generator, where: str,
              dtype=torch.float32):
    """`steps` steps of random logits through the sampler and the oracle; both sequences grow by the token."""
    for step in range(steps):
        scale = float(torch.empty(()).uniform_(0.5, 4.0, generator=gen))
        logits = (torch.randn(len(rows), vocab, generator=gen) * scale).to(dtype).to(sampler.device)
        expected = [oracle_choice(r, logits[i]) for i, r in enumerate(rows)]
        choices = sampler.step(logits, rows)
        for i, (r, choice, want) in enumerate(zip(rows, choices, expected)):
            assert_same(choice, want, f"{where} step {step} row {i} {r.chooser.params}")
            r.tokens.append(choice.token)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", range(40))
def test_the_batched_step_chooses_what_each_oracle_chooses(mix, device):
    rng = random.Random(mix)
    vocab = rng.choice([7, 50, 1000])
    rows = [make_row(random_params(rng, vocab), [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))], device)
            for _ in range(rng.randrange(1, 10))]
    run_steps(BatchSampler(device), rows, vocab, 4, torch.Generator().manual_seed(mix), f"mix {mix}")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logits_and_a_greedy_batch(device):
    rng = random.Random(5)
    rows = [make_row(SamplingParams(return_k_alternatives=rng.choice([0, 2])), [1, 2, 3], device) for _ in range(6)]
    run_steps(BatchSampler(device), rows, 300, 3, torch.Generator().manual_seed(1), "greedy bf16", torch.bfloat16)
    rows = [make_row(random_params(rng, 300), [4, 5], device) for _ in range(6)]
    run_steps(BatchSampler(device), rows, 300, 3, torch.Generator().manual_seed(2), "mixed bf16", torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [
    dict(top_p=0.25), dict(top_p=0.2501), dict(top_p=0.5), dict(top_p=0.5001), dict(top_p=0.75),
    dict(typical_p=0.5), dict(top_k=2), dict(top_k=3, top_p=0.5),
])
def test_boundaries_on_exact_probabilities_match_the_oracle(params, device):
    """Four equal logits (each probability exactly 1/4), in a batch with other rows: the kept sets at the
    boundaries of top-p and typical-p are the oracle's, for every seed."""
    logits = torch.zeros(5, 4, device=device)
    logits[1] = torch.tensor([3.0, 1.0, 0.5, -1.0])
    rows = [make_row(SamplingParams(return_k_alternatives=4, seed=s, **params), [0], device) for s in range(5)]
    rows[3] = make_row(SamplingParams(), [0], device)
    for i, (r, choice) in enumerate(zip(rows, BatchSampler(device).step(logits, rows))):
        assert_same(choice, oracle_choice(r, logits[i]), f"row {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_and_penalties_round_as_the_oracle_does(device):
    """The whole final distribution, bit for bit: divisions by a temperature or a repetition penalty round
    as the oracle's division by a Python float does on that device, so near-ties break the same way."""
    vocab = 257
    rows = [make_row(SamplingParams(temperature=t, repetition_penalty=rp, frequency_penalty=f, do_sample=True,
                                    return_k_alternatives=vocab), [1, 5, 5, 9, 200], device)
            for t, rp, f in [(0.7, 1.0, 0.0), (1.7, 1.0, 0.0), (0.3, 1.3, 0.0), (1.0, 1.7, 0.37), (2.9, 0.6, -0.2)]]
    logits = (torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(4)) * 3).to(device)
    for i, (r, choice) in enumerate(zip(rows, BatchSampler(device).step(logits, rows))):
        token, logprob, alternatives = oracle_choice(r, logits[i])
        assert (choice.token, choice.logprob) == (token, logprob), i
        assert sorted(choice.alternatives) == sorted(alternatives), i


def test_the_race_is_multinomial_draw_for_draw():
    """torch.multinomial(p, 1, generator) and argmax(p / Exp(1) noise) consume and use the same draws."""
    probs = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)).softmax(-1)
    seeds = [0, 7, 2**64 - 1]
    mine = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(5):
        got = race(probs, mine).tolist()
        assert got == [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, theirs)]


# -- counts on the device, following their requests ---------------------------------------------------


def assert_counts(rows: List[Row], vocab: int):
    for r in rows:
        want = torch.bincount(torch.tensor(r.tokens), minlength=vocab).float()
        assert r.counts is not None and torch.equal(r.counts.cpu(), want), r.tokens


@pytest.mark.parametrize("device", DEVICES)
def test_counts_follow_their_rows_when_rows_leave_reorder_and_join(device):
    """Filter (rows leave, the others keep their order), concatenate (a batch joins, with rows new to the
    sampler) and a reorder: every penalised row's counts are its own sequence's, and the tokens stay the
    oracle's (which recounts the sequence every step)."""
    rng, vocab = random.Random(3), 40
    gen = torch.Generator().manual_seed(3)
    sampler = BatchSampler(device)

    def batch(n, seed):
        return [make_row(SamplingParams(do_sample=True, seed=seed + i, repetition_penalty=1.5, frequency_penalty=0.4,
                                        presence_penalty=0.3, top_k=rng.choice([0, 10])),
                         [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))], device) for i in range(n)]

    first, second = batch(5, 100), batch(3, 200)
    run_steps(sampler, first, vocab, 3, gen, "first")
    run_steps(sampler, second, vocab, 2, gen, "second")
    assert_counts(first + second, vocab)
    kept = [first[4], first[1], first[2]]  # filter, in another order than the batch's
    merged = kept + second + [make_row(SamplingParams(), [1, 2], device)]  # concatenate, with an unpenalised row
    run_steps(sampler, merged, vocab, 3, gen, "merged")
    assert_counts(kept + second, vocab)
    assert merged[-1].counts is None  # a request without penalties gets no counts


# -- rows that are not finite --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("broken", [math.nan, math.inf, -math.inf])
def test_a_row_that_is_not_finite_ends_alone(broken, device):
    """NaN anywhere, +inf anywhere, or -inf everywhere: that row's choice carries the error, in the same
    sync; its batch-mates get the oracle's choices."""
    rng, vocab = random.Random(8), 60
    rows = [make_row(random_params(rng, vocab), [1, 2, 3], device) for _ in range(6)]
    rows[2] = make_row(SamplingParams(do_sample=True, seed=1, repetition_penalty=1.2), [1, 2], device)
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    if broken == -math.inf:
        logits[2] = broken
        logits[4] = broken
    else:
        logits[2, 7] = broken
        logits[4, 0] = broken
    expected = {i: oracle_choice(r, logits[i]) for i, r in enumerate(rows) if i not in (2, 4)}
    choices = BatchSampler(device).step(logits, rows)
    assert choices[2].error == NON_FINITE and choices[4].error == NON_FINITE
    for i, want in expected.items():
        assert_same(choices[i], want, f"row {i}")


# -- one host synchronisation per step -------------------------------------------------------------------


@contextlib.contextmanager
def counted_syncs(monkeypatch):
    """Counts the tensor methods that bring values to the host; on a GPU, any other sync raises (the
    counted calls themselves run with the check off)."""
    calls = {}
    for name in ["tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"]:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            with sync_allowed():
                return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield calls
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()


@contextlib.contextmanager
def sync_allowed():
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["greedy", "everything"])
def test_a_step_synchronises_once(mix, device, monkeypatch):
    rng, vocab = random.Random(11), 500
    if mix == "greedy":
        rows = [make_row(SamplingParams(return_k_alternatives=2), [1, 2], device) for _ in range(8)]
    else:  # every control in one batch, penalised rows seen for the first time (their counts are built)
        rows = [make_row(SamplingParams(do_sample=True, seed=i, temperature=0.7, top_k=50, top_p=0.9, typical_p=0.9,
                                        repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5,
                                        return_k_alternatives=3, watermark=i % 2 == 0), [1, 2, 3], device)
                for i in range(4)] + [make_row(random_params(rng, vocab), [4, 5], device) for _ in range(4)]
    logits = torch.randn(8, vocab, device=device)
    sampler = BatchSampler(device)
    for _ in range(2):  # the first step builds the counts, the second reads them
        with counted_syncs(monkeypatch) as calls:
            choices = sampler.step(logits, rows)
        assert calls == {"tolist": 1}, calls
        for r, c in zip(rows, choices):
            r.tokens.append(c.token)


def test_the_parameters_go_to_the_device_again_only_when_they_change(monkeypatch):
    """A decode step with the requests of the step before reuses the uploaded parameter table."""
    uploads = []
    real = BatchSampler.upload
    monkeypatch.setattr(BatchSampler, "upload", lambda self, values, dtype: uploads.append(len(values)) or
                        real(self, values, dtype))
    rng = random.Random(4)
    rows = [make_row(random_params(rng, 40), [1, 2], "cpu") for _ in range(5)]
    rows[0] = make_row(SamplingParams(do_sample=True, seed=1, top_k=3), [1], "cpu")
    sampler, gen = BatchSampler("cpu"), torch.Generator().manual_seed(0)
    run_steps(sampler, rows, 40, 3, gen, "same rows")
    assert uploads  # the table, and the first counts of penalised rows
    before = len(uploads)
    run_steps(sampler, rows, 40, 2, gen, "same rows again")
    assert len(uploads) == before  # nothing new: the counts exist, the table is the last one
    rows[0].chooser.params = rows[0].oracle.params = SamplingParams(do_sample=True, seed=1, top_k=7)
    run_steps(sampler, rows, 40, 1, gen, "one request's parameters changed")
    assert len(uploads) == before + 1
    run_steps(sampler, rows[1:], 40, 1, gen, "a request left")
    assert len(uploads) == before + 2


def test_a_greedy_batch_takes_the_short_path(monkeypatch):
    """No sampled, penalised or watermarked row: argmax and log_softmax, none of the full path."""
    monkeypatch.setattr(BatchSampler, "choose", lambda *a: pytest.fail("the full path ran for a greedy batch"))
    rows = [make_row(SamplingParams(seed=3, return_k_alternatives=k), [1], "cpu") for k in (0, 2, 9)]
    logits = torch.randn(3, 9)
    for i, (r, choice) in enumerate(zip(rows, BatchSampler("cpu").step(logits, rows))):
        assert_same(choice, oracle_choice(r, logits[i]), f"row {i}")


def test_the_logits_are_not_written(monkeypatch):
    """fp32 logits are the model's own buffer (a CUDA graph's output): every op on them is out of place."""
    rng = random.Random(2)
    rows = [make_row(random_params(rng, 30), [1, 2], "cpu") for _ in range(8)]
    logits = torch.randn(8, 30)
    before = logits.clone()
    BatchSampler("cpu").step(logits, rows)
    assert torch.equal(logits, before)
