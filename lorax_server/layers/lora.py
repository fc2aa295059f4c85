"""LoRA hook points: a base linear whose output slices take per-token low-rank deltas.

A fused layer (q/k/v in one matmul) has one slice per target name. With `adapter_data=None` the layer
is exactly its base. Otherwise `adapter_data` (lorax_server.adapters.AdapterBatchData) adds, to each
token's rows, scale * (x @ A) @ B of that token's adapter.

Tensor parallelism: a column-parallel base keeps A whole and B sliced like its output. A row-parallel
base is built with `reduce=False` and given `reduce_group`: its A is sliced like its input, so the delta
computed on each rank is a partial sum, added to the base's partial sum before the one all-reduce
(sum_r (x_r A_r) B = (x A) B). Every rank therefore ends with the same, complete result.
"""

from typing import Optional, Sequence

import torch
from torch import nn

from lorax_server.utils.dist import all_reduce


class MultiAdapterLinear(nn.Module):
    def __init__(self, base: nn.Module, layer_id: int, layer_names: Sequence[str], sizes: Sequence[int],
                 reduce_group: Optional[object] = None):
        super().__init__()
        self.base = base
        self.layer_id = layer_id
        self.layer_names = tuple(layer_names)
        self.sizes = tuple(sizes)
        self.reduce_group = reduce_group

    def forward(self, x: torch.Tensor, adapter_data=None) -> torch.Tensor:
        y = self.base(x)
        if adapter_data is not None:
            adapter_data.add_fused_lora(y, x, self.layer_id, self.layer_names, self.sizes)
        return y if self.reduce_group is None else all_reduce(y, self.reduce_group)
