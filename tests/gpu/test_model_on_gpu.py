"""The whole model on the GPU (bf16, Triton backends) against transformers in fp32 on the CPU."""

import pytest
import torch

from tests.gpu.conftest import relative_error, skip_without_gpu

skip_without_gpu()

from lorax_server.utils.backends import CHOSEN
from tests.tiny_mixtral import load_ours, paged_logits, reference_logits, save_tiny_mixtral

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window", [None, 6])
def test_bf16_model_on_gpu_matches_transformers(tmp_path, window):
    hf = save_tiny_mixtral(tmp_path, hidden_size=128, intermediate_size=256, head_dim=32, sliding_window=window)
    ours = load_ours(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert CHOSEN["moe"] == "triton" and CHOSEN["attention"] == "triton" and CHOSEN["norm"] == "triton"
    sequences = [list(range(3, 25)), list(range(40, 49)), list(range(60, 90))]
    got = paged_logits(ours, sequences, [15, 4, 22], device="cuda", dtype=torch.bfloat16)
    agree = []
    for tokens, logits in zip(sequences, got):
        want = reference_logits(hf, tokens)
        assert relative_error(logits.cpu(), want) < 3e-2
        agree.append(logits.argmax(-1).cpu() == want.argmax(-1))
    # bf16 against fp32 on a random tiny model: near-ties flip now and then (8 of 9 seen on an H200)
    assert torch.cat(agree).float().mean() > 0.85
