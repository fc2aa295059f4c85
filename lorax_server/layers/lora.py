"""LoRA hook points: a base linear whose output slices take per-token low-rank deltas.

A fused layer (q/k/v in one matmul) has one slice per target name. With `adapter_data=None` the layer
is exactly its base. Otherwise `adapter_data` (lorax_server.adapters.AdapterBatchData) adds, to each
token's rows, scale * (x @ A) @ B of that token's adapter. Under tensor parallelism a column-parallel
base keeps A whole and B sliced like its output; a row-parallel base slices A like its input, so the
shrink x @ A is a partial sum that is all-reduced before the expand, and every rank adds the same delta.
"""

from typing import Sequence

import torch
from torch import nn


class MultiAdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, layer_id: int, layer_names: Sequence[str], sizes: Sequence[int],
                 row_parallel: bool = False):
        super().__init__()
        self.base = base
        self.layer_id = layer_id
        self.layer_names = tuple(layer_names)
        self.sizes = tuple(sizes)
        self.row_parallel = row_parallel

    def forward(self, x: torch.Tensor, adapter_data=None) -> torch.Tensor:
        y = self.base(x)
        if adapter_data is None:
            return y
        start = 0
        for name, size in zip(self.layer_names, self.sizes):
            adapter_data.add_lora(y[:, start:start + size], x, self.layer_id, name, self.row_parallel)
            start += size
        return y
