"""Token choice: greedy, top-p filtering, parameter validation."""

import pytest
import torch

from lorax_server.utils.errors import RequestError
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams, top_p_filter


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
