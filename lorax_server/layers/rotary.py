"""Rotary position embeddings (rotate-half layout, as Mixtral checkpoints expect) and their scaling types.

The inverse frequencies follow transformers' `ROPE_INIT_FUNCTIONS` for the types a Mixtral config can
carry (default, linear, dynamic, yarn, llama3); tests compare them one by one. cos/sin are computed once
per forward from the position ids and shared by every layer.
"""

import math
from typing import Tuple

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_inv_freq(params: dict, dim: int, max_positions: int) -> Tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend in between; scale attention by mscale."""
    base, factor = params["rope_theta"], params.get("factor")
    original = params.get("original_max_position_embeddings", max_positions)
    factor = factor if factor is not None else max_positions / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = base ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp
    inv_freq = (1.0 / (factor * extrapolation)) * (1 - keep) + (1.0 / extrapolation) * keep
    return inv_freq, attention_factor


def llama3_inv_freq(params: dict, dim: int, max_positions: int) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, smooth the band between."""
    inv_freq = base_inv_freq(params["rope_theta"], dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params.get("original_max_position_embeddings", max_positions)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [tokens, head_dim / 2] for a batch of positions."""

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.params = dict(rope_parameters)
        self.rope_type = self.params.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type '{self.rope_type}' is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_scaling = self.inv_freq_for(max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def inv_freq_for(self, seq_len: int) -> Tuple[torch.Tensor, float]:
        p, dim, max_pos = self.params, self.head_dim, self.max_position_embeddings
        if self.rope_type == "linear":
            return base_inv_freq(p["rope_theta"], dim) / p["factor"], 1.0
        if self.rope_type == "dynamic":
            # NTK-aware: grow the base with the longest sequence in the batch once it passes the trained length.
            seq_len = max(seq_len, max_pos)
            base = p["rope_theta"] * ((p["factor"] * seq_len / max_pos) - (p["factor"] - 1)) ** (dim / (dim - 2))
            return base_inv_freq(base, dim), 1.0
        if self.rope_type == "yarn":
            return yarn_inv_freq(p, dim, max_pos)
        if self.rope_type == "llama3":
            return llama3_inv_freq(p, dim, max_pos), 1.0
        return base_inv_freq(p["rope_theta"], dim), 1.0

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope_type == "dynamic":
            longest = int(position_ids.max()) + 1 if position_ids.numel() else 0
            if longest > self.max_position_embeddings:
                inv_freq = self.inv_freq_for(longest)[0].to(inv_freq.device)
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [T, D/2]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, D] by (cos, sin) [T, D/2] in the rotate-half layout; returns a new tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
