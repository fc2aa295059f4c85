"""Watermarking: the green list against an independent computation, the bias, the env settings, the
place in NextTokenChooser's pipeline, and detection by z-score. CPU only."""

import math

import pytest
import torch

from lorax_server.utils.tokens import NextTokenChooser, SamplingParams
from lorax_server.utils.watermark import HASH_KEY, Watermark

VOCAB = 1000


def oracle_green(previous_token: int, vocab: int, gamma: float) -> set:
    """The documented algorithm, written out: seed a CPU generator with key * previous token, permute the
    vocabulary with randperm, keep the first int(vocab * gamma) ids."""
    g = torch.Generator()
    g.manual_seed(15485863 * previous_token)
    return set(torch.randperm(vocab, generator=g)[: int(vocab * gamma)].tolist())


@pytest.fixture(autouse=True)
def no_watermark_env(monkeypatch):
    monkeypatch.delenv("WATERMARK_GAMMA", raising=False)
    monkeypatch.delenv("WATERMARK_DELTA", raising=False)


def test_defaults_are_upstreams():
    w = Watermark()
    assert (w.gamma, w.delta, w.hash_key) == (0.5, 2.0, 15485863) and HASH_KEY == 15485863


@pytest.mark.parametrize("previous_token", [0, 1, 7, 999])
@pytest.mark.parametrize("gamma", [0.5, 0.25, 0.29])
def test_green_list_matches_the_documented_algorithm(previous_token, gamma):
    green = Watermark(gamma=gamma).green_ids(previous_token, VOCAB)
    assert len(green) == int(VOCAB * gamma)  # 0.29 * 1000 = 289.99.. truncates to 289, as upstream
    assert set(green.tolist()) == oracle_green(previous_token, VOCAB, gamma)


def test_green_list_depends_on_the_previous_token_only():
    w = Watermark()
    assert torch.equal(w.green_ids(5, VOCAB), w.green_ids(5, VOCAB))
    assert set(w.green_ids(5, VOCAB).tolist()) != set(w.green_ids(6, VOCAB).tolist())
    logits = torch.randn(VOCAB)
    assert torch.equal(w(logits, [3, 9, 5]), w(logits, [5]))  # only the last token seeds


def test_delta_is_added_to_green_ids_and_nothing_else():
    logits = torch.randn(VOCAB)
    before = logits.clone()
    out = Watermark(delta=3.5)(logits, [11, 42])
    green = torch.zeros(VOCAB, dtype=torch.bool)
    green[list(oracle_green(42, VOCAB, 0.5))] = True
    assert torch.equal(out[green], before[green] + 3.5)
    assert torch.equal(out[~green], before[~green])
    assert torch.equal(logits, before)  # the caller's logits are not written


def test_env_sets_gamma_and_delta(monkeypatch):
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "5")
    w = Watermark()
    assert (w.gamma, w.delta) == (0.25, 5.0)
    out = w(torch.zeros(VOCAB), [3])
    assert set(out.nonzero().flatten().tolist()) == oracle_green(3, VOCAB, 0.25)
    assert set(out.unique().tolist()) == {0.0, 5.0}


@pytest.mark.parametrize("name,value", [("WATERMARK_GAMMA", "half"), ("WATERMARK_GAMMA", "1.5"),
                                        ("WATERMARK_DELTA", "nan")])
def test_bad_env_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        Watermark()


def test_watermark_needs_a_previous_token():
    with pytest.raises(ValueError):
        Watermark()(torch.zeros(VOCAB), [])


def test_greedy_picks_a_green_token_when_the_bias_flips_the_argmax():
    previous = [17]
    green = sorted(oracle_green(17, VOCAB, 0.5))
    red = next(t for t in range(VOCAB) if t not in set(green))
    logits = torch.zeros(VOCAB)
    logits[red] = 1.0  # the best token, but red
    logits[green[0]] = 0.5  # behind it by 0.5; with delta 2 ahead by 1.5
    plain, _, _ = NextTokenChooser(SamplingParams())(logits, previous)
    marked, logprob, _ = NextTokenChooser(SamplingParams(watermark=True))(logits, previous)
    assert plain == red and marked == green[0]
    assert logprob == pytest.approx(Watermark()(logits, previous).log_softmax(-1)[green[0]].item())


def test_watermark_applies_before_the_repetition_penalty():
    # Upstream biases first, then penalises: a seen red token with logit -1 becomes -1 * 2 = -2; a seen
    # green one with logit -1 becomes (-1 + 2) / 2 = 0.5 (penalising first would give -2 + 2 = 0).
    green = sorted(oracle_green(4, VOCAB, 0.5))
    assert green[0] != 4
    logits = torch.full((VOCAB,), -10.0)
    logits[green[0]] = -1.0
    chooser = NextTokenChooser(SamplingParams(watermark=True, repetition_penalty=2.0, return_k_alternatives=1))
    token, logprob, _ = chooser(logits, [green[0], 4])
    expected = Watermark()(logits, [4])
    expected[green[0]] = 0.5
    expected[4] = expected[4] / 2 if expected[4] > 0 else expected[4] * 2
    assert token == green[0]
    assert logprob == pytest.approx(expected.log_softmax(-1)[green[0]].item(), abs=1e-6)


def test_watermark_alone_stays_greedy():
    chooser = NextTokenChooser(SamplingParams(watermark=True))
    assert chooser.generator is None and NextTokenChooser(SamplingParams()).watermark is None


def generate(watermark: bool, steps: int, seed: int):
    """Samples `steps` tokens from fresh random logits each step (a stand-in for a model)."""
    torch.manual_seed(seed)
    chooser = NextTokenChooser(SamplingParams(do_sample=True, seed=seed + 1, watermark=watermark))
    tokens = [int(torch.randint(VOCAB, ()))]
    for _ in range(steps):
        token, _, _ = chooser(torch.randn(VOCAB) * 2, tokens)
        tokens.append(token)
    return tokens


def test_watermarked_text_is_detected_and_plain_text_is_not():
    w = Watermark()
    marked = w.z_score(generate(True, 150, seed=1), VOCAB)
    plain = w.z_score(generate(False, 150, seed=1), VOCAB)
    assert marked > 4 and abs(plain) < 3


def test_z_score_formula():
    w = Watermark(gamma=0.25)
    tokens = [3]
    for _ in range(8):  # all green
        tokens.append(int(w.green_ids(tokens[-1], VOCAB)[0]))
    assert w.z_score(tokens, VOCAB) == pytest.approx((8 - 2) / math.sqrt(8 * 0.25 * 0.75))
    assert w.z_score(tokens, VOCAB, start=5) == pytest.approx((4 - 1) / math.sqrt(4 * 0.25 * 0.75))
    with pytest.raises(ValueError):
        w.z_score(tokens, VOCAB, start=0)
