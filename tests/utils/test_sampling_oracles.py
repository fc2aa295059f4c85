"""Oracles for every sampling control and stop rule, on hand-made logits with hand-computed answers.

Upstream (LoRAX's utils/tokens.py and logits_process.py) is the reference for the semantics: the
penalties first (repetition: a seen token's logit is divided by the penalty when positive and multiplied
when negative, once however often it was seen; frequency and presence, OpenAI's definition:
logit - frequency * count - presence * [count > 0]), then transformers' warpers in the order
temperature, top-k, top-p, typical-p. Top-k keeps every token whose logit reaches the k-th largest (ties
at the k-th value are all kept); top-p keeps a token while the mass of the tokens ranked above it is still
below p (so a set that reaches p exactly is not extended); typical-p does the same in order of
|surprise - entropy|. A seeded request draws from a torch.Generator seeded with its seed (0 included).

Everything goes through `NextTokenChooser`, the engine's per-request sampler: with
`return_k_alternatives` = vocabulary size its alternatives are the whole final distribution, so a
filtered token shows as a log-probability of -inf and a penalised logit as a shifted log-probability.
"""

import math

import pytest
import torch

from lorax_server.utils.tokens import NextTokenChooser, SamplingParams, StoppingCriteria

INF = math.inf


def distribution(logits, previous=(), **params):
    """(chosen token, its logprob, the final log-distribution [V]) of one call of the chooser."""
    logits = torch.tensor(logits, dtype=torch.float32)
    params.setdefault("seed", 1)
    chooser = NextTokenChooser(SamplingParams(return_k_alternatives=logits.shape[-1], **params))
    token, logprob, alternatives = chooser(logits, list(previous))
    full = torch.full(logits.shape, math.nan)
    for t, lp in alternatives:
        full[t] = lp
    assert not full.isnan().any(), "the alternatives must cover the whole vocabulary"
    return token, logprob, full


def kept(logits, previous=(), **params):
    """The set of token ids left with a finite probability."""
    return set(distribution(logits, previous, **params)[2].isfinite().nonzero().flatten().tolist())


def assert_distribution(got: torch.Tensor, expected_scores, keep=None):
    """got equals log_softmax(expected_scores) over `keep` (all tokens when None), -inf elsewhere."""
    scores = torch.tensor(expected_scores, dtype=torch.float32)
    if keep is not None:
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[list(keep)] = True
        scores = scores.masked_fill(~mask, -INF)
    want = scores.log_softmax(-1)
    assert torch.equal(got.isfinite(), want.isfinite()), (got, want)
    torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], atol=1e-5, rtol=0)


# -- temperature and penalties ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 2.0, 0.7])
def test_temperature_divides_the_logits(temperature):
    logits = [2.0, 1.0, 0.0, -1.0, 0.5]
    _, _, got = distribution(logits, temperature=temperature)
    assert_distribution(got, [x / temperature for x in logits])


def test_temperature_one_and_no_warper_is_greedy_on_the_raw_distribution():
    logits = [0.3, 2.5, -1.0, 2.4]
    token, logprob, got = distribution(logits, seed=5)
    assert token == 1
    assert_distribution(got, logits)
    assert logprob == pytest.approx(torch.tensor(logits).log_softmax(-1)[1].item(), abs=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]
    previous = [0, 1, 1, 1, 5]  # token 1 seen three times: penalised once, as upstream's gather/scatter does
    _, _, got = distribution(logits, previous, repetition_penalty=2.0)
    assert_distribution(got, [1.0, -2.0, 0.5, -0.5, 3.0, 0.0])
    _, _, got = distribution(logits, previous, repetition_penalty=0.5)  # below 1 it favours seen tokens
    assert_distribution(got, [4.0, -0.5, 0.5, -0.5, 3.0, 0.0])


@pytest.mark.parametrize("logits, expected", [
    ([2.0, 1.5, -3.0], 1),   # seen positive 2.0 -> 1.0, below 1.5 (reversed: 4.0 would win)
    ([-1.0, -1.5, -3.0], 1),  # seen negative -1.0 -> -2.0, below -1.5 (reversed: -0.5 would win)
])
def test_repetition_penalty_direction_changes_the_greedy_choice(logits, expected):
    assert distribution(logits, [0], repetition_penalty=2.0)[0] == expected
    assert distribution(logits, [2], repetition_penalty=2.0)[0] == 0  # penalising another token changes nothing


def test_frequency_penalty_counts_and_presence_penalty_does_not():
    logits = [1.0, 1.0, 1.0, 1.0, 1.0]
    previous = [1, 1, 1, 3]
    _, _, got = distribution(logits, previous, frequency_penalty=0.5)
    assert_distribution(got, [1.0, 1.0 - 1.5, 1.0, 1.0 - 0.5, 1.0])
    _, _, got = distribution(logits, previous, presence_penalty=0.25)
    assert_distribution(got, [1.0, 0.75, 1.0, 0.75, 1.0])
    _, _, got = distribution(logits, previous, frequency_penalty=0.5, presence_penalty=0.25)
    assert_distribution(got, [1.0, -0.75, 1.0, 0.25, 1.0])


def test_penalties_in_upstreams_order_then_temperature():
    """repetition, then frequency and presence, then temperature: each order gives other numbers here."""
    logits = [2.0, 0.5, -1.0, 0.0]
    previous = [0, 2, 2]
    # repetition 2: [1.0, 0.5, -2.0, 0.0]; frequency 0.5 x counts (1, 0, 2, 0): [0.5, 0.5, -3.0, 0.0];
    # presence 0.25: [0.25, 0.5, -3.25, 0.0]; temperature 0.5: [0.5, 1.0, -6.5, 0.0].
    _, _, got = distribution(logits, previous, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                             temperature=0.5)
    assert_distribution(got, [0.5, 1.0, -6.5, 0.0])


def test_penalties_count_the_whole_sequence_so_far():
    """The previous tokens are the prompt and the generated ones alike (the engine passes all of them)."""
    logits = [3.0, 3.0, 3.0]
    assert_distribution(distribution(logits, [2, 2, 0, 2], frequency_penalty=1.0)[2], [2.0, 3.0, 0.0])


# -- top-k --------------------------------------------------------------------------------------------

TOP_K_LOGITS = [1.0, 4.0, 3.0, 2.0, 0.0, -1.0]


@pytest.mark.parametrize("k, expected", [
    (1, {1}), (2, {1, 2}), (3, {1, 2, 3}), (4, {0, 1, 2, 3}), (5, {0, 1, 2, 3, 4}), (6, set(range(6))),
    (50, set(range(6))),  # more than the vocabulary: everything
])
def test_top_k_keeps_exactly_k(k, expected):
    _, _, got = distribution(TOP_K_LOGITS, top_k=k)
    assert_distribution(got, TOP_K_LOGITS, keep=expected)


@pytest.mark.parametrize("logits, k, expected", [
    ([3.0, 1.0, 3.0, 2.0, 3.0, 0.0], 1, {0, 2, 4}),  # three tokens share the best value
    ([3.0, 1.0, 3.0, 2.0, 3.0, 0.0], 2, {0, 2, 4}),
    ([3.0, 1.0, 3.0, 2.0, 3.0, 0.0], 4, {0, 2, 3, 4}),
    ([5.0, 3.0, 3.0, 1.0, 0.0, 0.0], 2, {0, 1, 2}),  # the k-th value is tied: both are kept
    ([5.0, 3.0, 3.0, 1.0, 0.0, 0.0], 3, {0, 1, 2}),
    ([5.0, 3.0, 3.0, 1.0, 0.0, 0.0], 5, set(range(6))),
])
def test_top_k_keeps_every_token_tied_with_the_kth(logits, k, expected):
    """transformers' TopKLogitsWarper (upstream's warper): removes only logits below the k-th largest."""
    _, _, got = distribution(logits, top_k=k)
    assert_distribution(got, logits, keep=expected)


def test_top_k_zero_is_off():
    assert kept(TOP_K_LOGITS, top_k=0, do_sample=True) == set(range(6))


# -- top-p --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p, count", [
    (0.25, 1), (0.2501, 2), (0.4999, 2), (0.5, 2), (0.5001, 3), (0.75, 3), (0.7501, 4), (0.999, 4), (1.0, 4),
])
def test_top_p_boundary_on_exact_probabilities(top_p, count):
    """Four equal logits: every probability is exactly 1/4, so each set's mass is exact. A set whose mass
    reaches p exactly is not extended (upstream removes tokens whose ascending cumulative mass <= 1 - p)."""
    assert len(kept([0.0, 0.0, 0.0, 0.0], top_p=top_p)) == count


# probabilities 0.6, 0.25, 0.1, 0.05 at shuffled positions: token 1 is the best, then 3, 0, 2
TOP_P_PROBS = [0.1, 0.6, 0.05, 0.25]
TOP_P_LOGITS = [math.log(p) for p in TOP_P_PROBS]


@pytest.mark.parametrize("top_p, expected", [
    (0.01, {1}), (0.5, {1}), (0.59, {1}), (0.61, {1, 3}), (0.84, {1, 3}), (0.86, {1, 3, 0}), (0.94, {1, 3, 0}),
    (0.96, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    _, _, got = distribution(TOP_P_LOGITS, top_p=top_p)
    assert_distribution(got, TOP_P_LOGITS, keep=expected)


# -- typical-p ----------------------------------------------------------------------------------------

# probabilities 0.5, 0.3, 0.15, 0.05 at positions 2, 0, 3, 1. Entropy H = 1.14212 nats; the surprises
# -ln p are 0.69315, 1.20397, 1.89712, 2.99573, so |surprise - H| is 0.44897, 0.06185, 0.75500, 1.85361:
# the typical order is p=0.3 (token 0), p=0.5 (token 2), p=0.15 (token 3), p=0.05 (token 1), with
# cumulative masses 0.3, 0.8, 0.95, 1.0.
TYPICAL_PROBS = [0.3, 0.05, 0.5, 0.15]
TYPICAL_LOGITS = [math.log(p) for p in TYPICAL_PROBS]


@pytest.mark.parametrize("mass, expected", [
    (0.1, {0}), (0.29, {0}),  # the most probable token (2) is NOT the most typical: it is dropped
    (0.31, {0, 2}), (0.5, {0, 2}), (0.79, {0, 2}),
    (0.81, {0, 2, 3}), (0.94, {0, 2, 3}),
    (0.96, {0, 1, 2, 3}),
])
def test_typical_p_keeps_the_most_typical_tokens_up_to_the_mass(mass, expected):
    _, _, got = distribution(TYPICAL_LOGITS, typical_p=mass)
    assert_distribution(got, TYPICAL_LOGITS, keep=expected)


# -- warpers together: upstream's order ---------------------------------------------------------------


def test_top_k_before_top_p():
    """probabilities 0.4, 0.3, 0.2, 0.1; top-k 2 renormalises to 0.571, 0.429, so top-p 0.5 keeps one
    token (top-p first would keep two, and top-k then both)."""
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    _, _, got = distribution(logits, top_k=2, top_p=0.5)
    assert_distribution(got, logits, keep={0})


def test_temperature_before_top_p():
    """softmax([2, 1, 0]) = 0.665, 0.245, 0.090 keeps two tokens at top-p 0.7; at temperature 0.5 it is
    0.867, 0.117, 0.016, which keeps one."""
    _, _, got = distribution([2.0, 1.0, 0.0], temperature=0.5, top_p=0.7)
    assert_distribution(got, [4.0, 2.0, 0.0], keep={0})


def test_penalties_before_top_k():
    """repetition 4 turns token 0's 4.0 into 1.0, so top-k 2 keeps tokens 1 and 2."""
    logits = [4.0, 3.0, 2.0, 0.0]
    _, _, got = distribution(logits, [0], repetition_penalty=4.0, top_k=2)
    assert_distribution(got, [1.0, 3.0, 2.0, 0.0], keep={1, 2})


# -- seeds --------------------------------------------------------------------------------------------

SEED_LOGITS = torch.randn(32, generator=torch.Generator().manual_seed(7)) * 0.5  # flat: draws vary a lot
SEEDS = [0, 1, 2, 42, 2**32 + 5, 2**64 - 1]  # the router sends any u64; 0 is a seed, not "unset"
DRAWS = 12


def reference_draws(probs: torch.Tensor, seed: int, n: int):
    """The draws of a torch.Generator seeded with `seed`, by torch.multinomial (upstream's Sampling before
    it moved to the exponential race) and by the exponential race argmax(p / q), q ~ Exp(1) (upstream's
    Sampling now): a sampler must match one of them from its first draw to its last."""
    g = torch.Generator().manual_seed(seed)
    multinomial = [int(torch.multinomial(probs, 1, generator=g)) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    race = [int((probs / torch.empty_like(probs).exponential_(1, generator=g)).argmax()) for _ in range(n)]
    return multinomial, race


def draws(params: SamplingParams, logits: torch.Tensor, n: int = DRAWS):
    chooser = NextTokenChooser(params)
    out = []
    for i in range(n):
        torch.manual_seed(1000 + i)  # a sampler on the global generator gets the same draws for every seed
        out.append(chooser(logits, [])[0])
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_a_seed_draws_what_a_generator_with_that_seed_draws(seed):
    got = draws(SamplingParams(do_sample=True, seed=seed), SEED_LOGITS)
    assert got in reference_draws(SEED_LOGITS.log_softmax(-1).exp(), seed, DRAWS), got


def test_seeds_change_the_draw_and_the_same_seed_repeats_it():
    sequences = {seed: draws(SamplingParams(do_sample=True, seed=seed), SEED_LOGITS) for seed in SEEDS}
    assert len({tuple(s) for s in sequences.values()}) == len(SEEDS)  # every seed its own draws
    assert draws(SamplingParams(do_sample=True, seed=0), SEED_LOGITS) == sequences[0]
    assert draws(SamplingParams(do_sample=True, seed=42), SEED_LOGITS) == sequences[42]


def test_no_seed_draws_a_fresh_one():
    unseeded = [tuple(draws(SamplingParams(do_sample=True), SEED_LOGITS)) for _ in range(4)]
    assert len(set(unseeded)) > 1


def test_a_seeded_warped_draw_comes_from_the_warped_distribution():
    """top-k 3 at temperature 0.7: the draws match a generator with that seed over the 3 kept tokens."""
    params = SamplingParams(temperature=0.7, top_k=3, seed=9)
    scaled = SEED_LOGITS / 0.7
    warped = scaled.masked_fill(scaled < scaled.topk(3).values[-1], -INF)
    got = draws(params, SEED_LOGITS)
    assert set(got) <= set(SEED_LOGITS.topk(3).indices.tolist()) and len(set(got)) > 1
    assert got in reference_draws(warped.log_softmax(-1).exp(), 9, DRAWS)


def test_greedy_ignores_the_seed():
    assert set(draws(SamplingParams(seed=3), SEED_LOGITS)) == {int(SEED_LOGITS.argmax())}


# -- stopping -----------------------------------------------------------------------------------------


def stop_step(pieces, stop_sequences=(), max_new_tokens=50, eos=(99,), tokens=None, ignore_eos=False):
    """Feeds one text piece per token; returns (step, reason) of the first stop, or None."""
    stopping = StoppingCriteria(max_new_tokens, list(eos), list(stop_sequences), ignore_eos)
    for step, piece in enumerate(pieces, start=1):
        reason = stopping(tokens[step - 1] if tokens else 10 + step, piece, step)
        if reason:
            return step, reason
    return None


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hel", "lo wo", "rld", "!"], ["o world"], 3),  # across three tokens
    (["a", "b", "c", "d", "e"], ["abcd"], 4),  # one character per token
    (["x", "ST", "", "OP", "y"], ["STOP"], 4),  # an empty piece (a partial character) in between
    (["caf", "é", "!"], ["é!"], 3),  # non-ASCII across a boundary
    (["one ", "two", " thr", "ee"], ["zzz", "two thr"], 3),  # the second of two stop sequences
    (["ab", "STOP", "cd"], ["STOP"], 2),  # a whole token
    (["a", "b\n", "c"], ["b"], 2),  # upstream's `.*b$` also matches before one final newline
])
def test_a_stop_sequence_stops_when_the_text_ends_with_it(pieces, stops, expected):
    assert stop_step(pieces, stops) == (expected, "stop_sequence")


@pytest.mark.parametrize("pieces, stops", [
    (["x", "xSTOPx", "y"], ["STOP"]),  # passed through inside one token
    (["ST", "OPx", "y"], ["STOP"]),  # passed through across two tokens
    (["a", "b\n\n", "c"], ["b"]),  # two newlines after it: `.*b$` does not match
    (["abc"], ["abcd"]),
])
def test_a_stop_sequence_the_text_only_passes_through_does_not_stop(pieces, stops):
    assert stop_step(pieces, stops) is None


def test_finish_reasons_in_upstreams_order():
    # the last allowed token: length wins over EOS and over a stop sequence
    assert stop_step(["a", "end"], ["end"], max_new_tokens=2, tokens=[5, 99]) == (2, "length")
    assert stop_step(["end"], ["end"], max_new_tokens=1, tokens=[99]) == (1, "length")
    # before it: EOS wins over a stop sequence
    assert stop_step(["a", "end"], ["end"], max_new_tokens=5, tokens=[5, 99]) == (2, "eos")
    # then the stop sequence
    assert stop_step(["a", "end"], ["end"], max_new_tokens=5, tokens=[5, 6]) == (2, "stop_sequence")
    assert stop_step(["a", "b", "c"], max_new_tokens=3) == (3, "length")


def test_ignore_eos_and_several_eos_ids():
    assert stop_step(["a", "b", "c"], eos=(7, 8), tokens=[5, 8, 7]) == (2, "eos")
    assert stop_step(["a", "b", "c"], eos=(7, 8), tokens=[5, 8, 7], ignore_eos=True, max_new_tokens=3) == (3, "length")
    assert stop_step(["a", "end", "c"], ["end"], eos=(8,), tokens=[5, 8, 7], ignore_eos=True) == (2, "stop_sequence")
