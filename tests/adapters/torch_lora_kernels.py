"""Torch stand-ins for the Triton LoRA kernels (lorax_server/kernels/lora.py), written from their documented
arithmetic, so the stacked-adapter paths (adapters/stacked.py, AdapterBatchData with stacks) run on a CPU and
can be compared there with the per-adapter loop, the kernels' oracle. Slow and plain on purpose."""

import torch


def shrink(x, a, slots, sections=1, x_index=None, x_row_div=1):
    """v [N, sections * R] fp32: v[i] = A[slots[i]] @ x[j], j = x_index[i] or i // x_row_div; zeros for slot -1."""
    rows = x_index.long() if x_index is not None else torch.arange(len(slots)) // x_row_div
    v = torch.zeros(len(slots), a.shape[1])
    live = slots >= 0
    v[live] = torch.bmm(a[slots[live].long()].float(), x[rows[live]].float().unsqueeze(2)).squeeze(2)
    return v


def expand(y, v, b, slots, section_ends=(), y_shifts=(0,), row_scale=None, accumulate=True):
    """y (+)= row_scale * B[slot] @ v[section]: row n of B (section i: below section_ends[i]) lands in column
    n + y_shifts[i]; without `accumulate` those columns are overwritten, with zeros where the slot is -1."""
    rank = b.shape[2]
    ends = list(section_ends) or [b.shape[1]]
    live = slots >= 0
    start = 0
    for i, end in enumerate(ends):
        delta = torch.zeros(len(slots), end - start)
        piece = b[slots[live].long(), start:end].float()  # [n, rows of this section, R]
        delta[live] = torch.bmm(piece, v[live, i * rank:(i + 1) * rank].unsqueeze(2)).squeeze(2)
        if row_scale is not None:
            delta = delta * row_scale.float().unsqueeze(1)
        shift = y_shifts[i] if i < len(y_shifts) else 0
        columns = slice(start + shift, end + shift)
        if accumulate:
            y[:, columns] += delta.to(y.dtype)
        else:
            y[:, columns] = delta.to(y.dtype)
        start = end


def sgmv(*args):
    """The grouped kernel serves expert LoRA over many rows without a row scale; the CPU model's MoE always passes
    one (its BGMV path), so these tests never reach it."""
    raise AssertionError("sgmv has no stand-in: the CPU paths these tests take do not use it")


KERNELS = (shrink, expand, sgmv)
