"""Token choice: greedy, top-p filtering, parameter validation."""

import pytest
import torch

from lorax_server.utils.errors import RequestError
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams, StoppingCriteria, top_p_filter


def test_greedy_is_argmax():
    chooser = NextTokenChooser(SamplingParams())
    token, logprob, _ = chooser(torch.tensor([0.1, 2.0, -1.0]), [])
    assert token == 1 and abs(logprob - torch.tensor([0.1, 2.0, -1.0]).log_softmax(-1)[1].item()) < 1e-6


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs.log(), 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(probs.log(), 0.01).isfinite().tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_parameters_are_refused(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def stop_after(pieces, **kwargs):
    """Feeds text pieces (one per token, token id = position) to a StoppingCriteria; returns (step, reason)."""
    stopping = StoppingCriteria(kwargs.pop("max_new_tokens", 10), kwargs.pop("eos", [99]), **kwargs)
    for step, piece in enumerate(pieces, start=1):
        reason = stopping(kwargs.get("token_at", {}).get(step, step), piece, step)
        if reason:
            return step, reason
    return None


def test_stop_sequence_across_two_tokens_stops_where_the_text_ends_with_it():
    assert stop_after(["Hel", "lo wo", "rld", "!"], stop_sequences=["o world"]) == (3, "stop_sequence")
    assert stop_after(["a", "b\n", "c"], stop_sequences=["b"]) == (2, "stop_sequence")  # upstream's `.*b$`


def test_stop_sequence_passed_through_inside_a_token_does_not_stop():
    assert stop_after(["x", "xSTOPx", "y"], stop_sequences=["STOP"]) is None


def test_finish_reasons_in_upstreams_order():
    stopping = StoppingCriteria(2, [7], ["end"])
    assert stopping(7, "end", 2) == "length"  # the last allowed token wins over EOS and the stop sequence
    stopping = StoppingCriteria(5, [7], ["end"])
    assert stopping(7, "end", 1) == "eos"
    assert StoppingCriteria(5, [7], ["end"], ignore_eos=True)(7, "end", 1) == "stop_sequence"
