"""Green-list watermarking ("A Watermark for Large Language Models", Kirchenbauer et al., 2023).

Before each token is chosen, the previous token seeds a random permutation of the vocabulary; its first
`int(vocab * gamma)` ids are that step's green list, and `delta` is added to their logits. Text written
this way holds more green tokens than chance would give, which `Watermark.z_score` measures without the
model: it needs only the token ids, the vocabulary size, gamma and the hash key.

The green list is the one LoRAX and TGI serve, so their detectors read our text and ours reads theirs:
 - the generator is seeded with `hash_key * previous_token` (hash key 15485863, a large prime) and the
   permutation is `torch.randperm(vocab, generator=...)`, on the device the logits are on;
 - vocab is the width of the logits row, not the tokenizer's length;
 - gamma and delta come from WATERMARK_GAMMA and WATERMARK_DELTA, 0.5 and 2.0 when unset.

The permutation is whatever torch's `randperm` gives for that seed on that device: the CPU and CUDA
generators draw different permutations from the same seed (seen with torch 2.11 on an H200, for
vocabularies of 1000 to 128256), so the green list of text served on a GPU must be recomputed on a GPU
(`z_score(..., device="cuda")`), as upstream's must; it may also change between torch versions.
"""

import math
import os
from typing import Dict, Optional, Sequence

import torch

HASH_KEY = 15485863
DEFAULT_GAMMA = 0.5
DEFAULT_DELTA = 2.0


def _env_float(name: str, default: float) -> float:
    value = os.getenv(name)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


class Watermark:
    """Biases one position's logits towards the green list of its previous token.

    gamma and delta default to the environment (read here, so a test or an operator can change them
    without reloading the module); the instance keeps no state between positions except one generator
    per device, reseeded on every call.
    """

    def __init__(self, gamma: Optional[float] = None, delta: Optional[float] = None, hash_key: int = HASH_KEY):
        self.gamma = _env_float("WATERMARK_GAMMA", DEFAULT_GAMMA) if gamma is None else float(gamma)
        self.delta = _env_float("WATERMARK_DELTA", DEFAULT_DELTA) if delta is None else float(delta)
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"watermark gamma must be in [0, 1], got {self.gamma}")
        self.hash_key = hash_key
        self._generators: Dict[torch.device, torch.Generator] = {}

    def green_ids(self, previous_token: int, vocab_size: int, device="cpu") -> torch.Tensor:
        """The green token ids [int(vocab_size * gamma)] that follow `previous_token`, on `device`."""
        device = torch.device(device)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(self.hash_key * int(previous_token))
        permutation = torch.randperm(vocab_size, generator=generator, device=device)
        return permutation[: int(vocab_size * self.gamma)]  # int() truncates, as upstream's does

    def __call__(self, logits: torch.Tensor, previous: Sequence[int]) -> torch.Tensor:
        """logits [..., vocab] of one position, previous token ids -> new logits, delta added to green ids."""
        if len(previous) == 0:
            raise ValueError("watermarking needs at least one previous token to seed the green list")
        green = self.green_ids(previous[-1], logits.shape[-1], logits.device)
        bias = torch.zeros_like(logits).index_fill_(-1, green, self.delta)
        return logits + bias  # a new tensor: the caller's logits may be the model's own output

    def z_score(self, tokens: Sequence[int], vocab_size: int, start: int = 1, device="cpu") -> float:
        """How far the green count of tokens[start:] lies above chance, in standard deviations.

        Each token is scored against the green list of the token before it, so `start` >= 1; pass the
        prompt's length to score only the generated part. Above about 4 is strong evidence of the
        watermark; unwatermarked text stays near 0.
        """
        if start < 1:
            raise ValueError("the first token has no previous token to seed its green list")
        if not 0 < self.gamma < 1:
            raise ValueError(f"a z-score needs 0 < gamma < 1, got {self.gamma}")
        scored = len(tokens) - start
        if scored <= 0:
            raise ValueError("no tokens to score")
        green = sum(
            bool((self.green_ids(tokens[i - 1], vocab_size, device) == tokens[i]).any())
            for i in range(start, len(tokens))
        )
        expected = self.gamma * scored
        return (green - expected) / math.sqrt(scored * self.gamma * (1 - self.gamma))
