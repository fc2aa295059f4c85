"""An adapter's LoRA weights as the model consumes them: sharded for this rank, scale folded into B."""

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

BASE_MODEL_ADAPTER_INDEX = 0

LayerKey = Tuple[int, str]  # (layer_id, target name such as "self_attn.q_proj"); lm_head uses layer_id -1


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model; nothing of it is loaded."""


@dataclass(frozen=True)
class LoraWeights:
    """LoRA on one linear: delta = (x @ a) @ b, with the scale already folded into b."""

    a: torch.Tensor  # [in_features (this rank's slice if row-parallel), r]
    b: torch.Tensor  # [r, out_features (this rank's slice if column-parallel)]

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass(frozen=True)
class ExpertLoraWeights:
    """LoRA on every expert of one MoE linear (w13 or w2): delta_e = b[e] @ (a[e] @ x), scale folded in."""

    a: torch.Tensor  # [E, r, in_features (this rank's slice for w2)]
    b: torch.Tensor  # [E, out_features (this rank's slice for w13), r]


@dataclass
class AdapterWeights:
    """Everything one adapter adds to the model, keyed by where it applies."""

    adapter_id: str
    linear: Dict[LayerKey, LoraWeights] = field(default_factory=dict)
    experts: Dict[LayerKey, ExpertLoraWeights] = field(default_factory=dict)  # name "w13" or "w2"

    @property
    def memory_bytes(self) -> int:
        tensors = [t for w in self.linear.values() for t in (w.a, w.b)]
        tensors += [t for w in self.experts.values() for t in (w.a, w.b)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def targets(self):
        return sorted({name for _, name in self.linear} | {f"experts.{name}" for _, name in self.experts})
