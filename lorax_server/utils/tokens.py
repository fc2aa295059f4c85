"""Choosing the next token and deciding when to stop, one request at a time.

The engine chooses the tokens of a whole batch at once (`lorax_server.engine.sampler`); `NextTokenChooser`
is its per-request oracle (the tests compare them) and its fallback should a batched step fail, and it
holds each request's sampling state (parameters, seed, generator, watermark).

`NextTokenChooser` follows LoRAX/TGI semantics: the watermark bias first (when asked for), then the
penalties (repetition, frequency, presence, over every token of the sequence so far), then the warpers
(temperature, top-k, top-p, typical-p); a request samples when `do_sample` is set or any warper is
active, otherwise it is greedy (a watermark alone does not make it sample). The log-probability
reported for a token is taken from the final, warped distribution, watermark bias included.
"""

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from lorax_server.utils.errors import RequestError
from lorax_server.utils.watermark import Watermark

NEG_INF = float("-inf")


# (field, what is allowed, check). The penalties' range is the router's (router/src/validation.rs): past it
# a penalty only pushes logits towards overflow.
SAMPLING_RANGES = (
    ("temperature", ">= 0", lambda v: v >= 0),
    ("top_p", "in (0, 1]", lambda v: 0 < v <= 1),
    ("typical_p", "in (0, 1]", lambda v: 0 < v <= 1),
    ("top_k", ">= 0", lambda v: v >= 0),
    ("return_k_alternatives", ">= 0", lambda v: v >= 0),
    ("repetition_penalty", "> 0 and finite", lambda v: v > 0),
    ("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
    ("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
)


@dataclass(frozen=True)
class SamplingParams:
    """What `NextTokenChooserParameters` carries; 0 in a float field means "unset" as in proto3."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    return_k_alternatives: int = 0
    watermark: bool = False

    def __post_init__(self):
        """Refuses, naming the field, any value the sampler cannot compute with (non-finite floats
        included: a NaN passes every comparison below as False, so each check is written to fail on it)."""
        for name, allowed, ok in SAMPLING_RANGES:
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise RequestError(f"{name} must be {allowed}, got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be a 64-bit unsigned integer, got {self.seed}")

    @property
    def samples(self) -> bool:
        warped = self.temperature not in (0.0, 1.0) or self.top_k > 0 or self.top_p < 1 or self.typical_p < 1
        return self.do_sample or warped


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    threshold = scores.topk(k).values[..., -1:]
    return scores.masked_fill(scores < threshold, NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of tokens whose probability reaches top_p (the best is always kept)."""
    if top_p >= 1:
        return scores
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    return scores.scatter(-1, order, sorted_scores.masked_fill(outside, NEG_INF))


def typical_filter(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    if mass >= 1:
        return scores
    logp = scores.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)
    distance = (-logp - entropy).abs()
    order = distance.argsort(dim=-1)
    probs = logp.gather(-1, order).exp()
    outside = probs.cumsum(-1) - probs >= mass
    return scores.scatter(-1, order, scores.gather(-1, order).masked_fill(outside, NEG_INF))


class NextTokenChooser:
    def __init__(self, params: SamplingParams, device="cpu"):
        self.params = params
        # Seed 0 is a seed (the router draws one for every request); only None asks for a fresh one.
        self.seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed(self.seed) if params.samples else None
        self.watermark = Watermark() if params.watermark else None

    def penalise(self, logits: torch.Tensor, previous: Sequence[int]) -> torch.Tensor:
        p = self.params
        if not previous or (p.repetition_penalty == 1 and not p.frequency_penalty and not p.presence_penalty):
            return logits  # the common case copies nothing to the device
        ids = torch.tensor(previous, dtype=torch.int64, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        seen = counts > 0
        if p.repetition_penalty != 1:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        return logits - p.frequency_penalty * counts - p.presence_penalty * seen.to(logits.dtype)

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.temperature not in (0.0, 1.0):
            scores = scores / p.temperature
        return typical_filter(top_p_filter(top_k_filter(scores, p.top_k), p.top_p), p.typical_p)

    def __call__(self, logits: torch.Tensor, previous: Sequence[int]) -> Tuple[int, float, List[Tuple[int, float]]]:
        """logits [vocab] of one position, previous [n] token ids so far -> (token, logprob, alternatives)."""
        scores = logits.float()
        if self.watermark is not None:
            # Before the penalties, as upstream: the repetition penalty then scales the biased logits.
            scores = self.watermark(scores, previous)
        scores = self.warp(self.penalise(scores, previous))
        logprobs = scores.log_softmax(-1)
        if self.generator is not None:
            token = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
        else:
            token = int(scores.argmax())
        alternatives = []
        if self.params.return_k_alternatives:
            top = logprobs.topk(min(self.params.return_k_alternatives, logprobs.shape[-1]))
            alternatives = list(zip(top.indices.tolist(), top.values.tolist()))
        return token, float(logprobs[token]), alternatives


class StoppingCriteria:
    """Stops on max_new_tokens, on EOS (unless ignored) and when the generated text ends with a stop sequence.

    Upstream's order and matching: the length limit wins over EOS, EOS over a stop sequence; a stop
    sequence matches where the text ends with it (or with it and one newline, as upstream's `.*stop$`),
    so one that the text only passes through inside a token does not stop it."""

    def __init__(self, max_new_tokens: int, eos_token_ids: Sequence[int], stop_sequences: Sequence[str] = (),
                 ignore_eos: bool = False):
        if max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = set() if ignore_eos else set(eos_token_ids)
        self.stop_sequences = [s for s in stop_sequences if s]
        self.longest_stop = max((len(s) for s in self.stop_sequences), default=0)
        # A match ends the text, so the text's last character must end a stop sequence (or be its newline).
        self.last_chars = {s[-1] for s in self.stop_sequences} | ({"\n"} if self.stop_sequences else set())
        self.text_tail = ""  # the last longest_stop + 1 characters of the text

    def __call__(self, token: int, new_text: str, generated: int) -> Optional[str]:
        """Returns "length", "eos", "stop_sequence" or None (keep going)."""
        if generated >= self.max_new_tokens:
            return "length"
        if token in self.eos_token_ids:
            return "eos"
        if self.stop_sequences and new_text:  # no new text: the text still ends as it did, without a stop
            self.text_tail = (self.text_tail + new_text)[-(self.longest_stop + 1):]
            if self.text_tail[-1] in self.last_chars and self.ends_with_stop():
                return "stop_sequence"
        return None

    def ends_with_stop(self) -> bool:
        return any(self.text_tail.endswith((s, s + "\n")) for s in self.stop_sequences)


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int]) -> List[float]:
    """Log-probability of each prompt token given the ones before it (NaN for the first)."""
    logp = logits.float().log_softmax(-1)
    ids = torch.tensor(prompt[1:], dtype=torch.int64, device=logits.device)
    return [math.nan] + logp[:-1].gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
