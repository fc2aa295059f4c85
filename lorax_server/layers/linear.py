"""Tensor-parallel linears, embedding and LM head.

Tensor parallelism lives here and nowhere in the model math: a column-parallel layer keeps this rank's
output rows and needs no communication; a row-parallel layer keeps this rank's input columns and owns
the all-reduce that sums the partial products; the vocabulary-parallel embedding and head own theirs.

With `weights.fp8_compute` (`--quantize fp8`) the column and row linears hold FP8 weights with one scale per
output channel (lorax_server/layers/fp8.py): a column-parallel shard keeps its rows' scales, a row-parallel
shard all of them. The embedding and the head stay in the compute dtype.
"""

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lorax_server.layers.fp8 import Fp8Tensors, fp8_linear, load_fp8_col, load_fp8_row
from lorax_server.utils.dist import all_gather_last_dim, all_reduce
from lorax_server.utils.weights import Weights


class Linear(nn.Module):
    """y = x @ W.T with W a float weight [out, in], or an FP8 one with `weight_scale` [out] (and a static
    `input_scale`, or None for per-token activation scales), multiplied by the FP8 backend chosen for it."""

    def __init__(self, weight: Union[torch.Tensor, Fp8Tensors]):
        super().__init__()
        fp8 = isinstance(weight, Fp8Tensors)
        self.weight = nn.Parameter(weight.weight if fp8 else weight, requires_grad=False)
        self.register_buffer("weight_scale", weight.weight_scale.float() if fp8 else None)
        self.register_buffer("input_scale", weight.input_scale if fp8 else None)
        self.fp8_matmul = fp8_linear(self.weight.device, *self.weight.shape) if fp8 else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul is None:
            return F.linear(x, self.weight)
        return self.fp8_matmul(x, self.weight, self.weight_scale, self.input_scale)


class TensorParallelColumnLinear(Linear):
    """y = x @ W_shard.T: this rank's slice of the output features (no communication)."""

    @classmethod
    def load_multi(cls, weights: Weights, prefixes: Sequence[str], shapes: Sequence[Sequence[int]]):
        """Fuses several column-parallel layers (q, k, v; or w1, w3) into one matmul."""
        if weights.fp8_compute:
            return cls(load_fp8_col(weights, prefixes, shapes))
        return cls(weights.get_multi_weights_col(prefixes, dim=0, shapes=shapes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class TensorParallelRowLinear(Linear):
    """y = sum over ranks of x_shard @ W_shard.T: the all-reduce happens here, once.

    With `reduce=False` the layer returns this rank's partial sum and its owner reduces (the MoE block
    sums all experts' partials in one all-reduce; a LoRA hook adds its partial delta first).
    """

    def __init__(self, weight: Union[torch.Tensor, Fp8Tensors], process_group, reduce: bool = True):
        super().__init__(weight)
        self.process_group = process_group
        self.reduce = reduce

    @classmethod
    def load(cls, weights: Weights, prefix: str, shape: Sequence[int], reduce: bool = True):
        weight = load_fp8_row(weights, prefix, shape) if weights.fp8_compute else \
            weights.get_multi_weights_row(prefix, shape=shape)
        return cls(weight, weights.process_group, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return all_reduce(y, self.process_group) if self.reduce else y


def vocab_shard(vocab_size: int, group) -> slice:
    """The rows of a vocabulary that `group.rank()` owns: blocks of ceil(vocab / world), the last one short."""
    block = -(-vocab_size // group.size())
    start = min(group.rank() * block, vocab_size)
    return slice(start, min(start + block, vocab_size))


def load_vocab_shard(weights: Weights, name: str, shape: Sequence[int]) -> torch.Tensor:
    """This rank's rows of a [vocab, hidden] matrix, zero-padded to the common block size."""
    group = weights.process_group
    block = -(-shape[0] // group.size())
    shard = weights.get_rows(name, vocab_shard(shape[0], group), shape)
    return F.pad(shard, (0, 0, 0, block - shard.shape[0]))


class TensorParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over ranks; ids outside this rank's rows contribute zero."""

    def __init__(self, weights: Weights, name: str, vocab_size: int, hidden_size: int):
        super().__init__()
        self.process_group = weights.process_group
        self.vocab_size = vocab_size
        self.rows = vocab_shard(vocab_size, self.process_group)
        self.weight = nn.Parameter(load_vocab_shard(weights, name, (vocab_size, hidden_size)), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.process_group.size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.rows.start
        outside = (local < 0) | (local >= self.rows.stop - self.rows.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(out, self.process_group)


class TensorParallelHead(nn.Module):
    """LM head with the vocabulary split over ranks; the logits are gathered so every rank sees all of them."""

    def __init__(self, weights: Weights, name: str, vocab_size: int, hidden_size: int):
        super().__init__()
        self.process_group = weights.process_group
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(load_vocab_shard(weights, name, (vocab_size, hidden_size)), requires_grad=False)

    def forward(self, x: torch.Tensor, gather: bool = True) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        return self.gather(logits) if gather else logits

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary block side by side, without the padding of the last block."""
        return all_gather_last_dim(local_logits, self.process_group)[..., : self.vocab_size]

