"""GPU tests: every kernel against the fp32 reference on random data. Skipped without CUDA and Triton."""

import importlib.util

import pytest
import torch


def skip_without_gpu() -> None:
    """Call at the top of a GPU test module, before importing anything that needs Triton."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device", allow_module_level=True)
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs the triton package", allow_module_level=True)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in the output"
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
