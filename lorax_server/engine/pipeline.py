"""Decode steps launched ahead of their Decode call, so that the GPU never waits for the host.

A step's tokens are chosen on the device and read by the host once (the sampler's one synchronisation).
Waiting for them, then making their text, then packing and launching the next step would leave the GPU idle
for all of that host work. So:
- after a step's tokens are read, the next step of the requests that surely go on is launched at once
  (`launch`), before their text is made and before the router's next Decode arrives;
- when every request of a Decode has a step in flight (the same batch, batches concatenated, a batch
  filtered), the step after that one is launched first, fed with the tokens the steps in flight chose on the
  device (`follow`), and only then are those tokens read: the GPU always has the next step queued.
- a structured-output request's mask needs its last token accepted by its grammar, on the host: with such
  requests in the batch, only the forward pass is launched first (`SampleLater`), and its sampling once the
  tokens in flight are read and the grammars took them (`add`), while the forward pass still runs.

The router decodes every live request at its next step (batches concatenated or filtered, never a request
skipped), so a choice made ahead is always the one its request needs next; a request filtered out or
cleared simply drops its own. A step launched ahead writes its K/V into the request's reserved blocks, at
the position the step would write anyway. The engine reads the choices into each request's `ahead`.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from lorax_server.engine.runner import ModelRunner, PendingChoices, to_device

logger = logging.getLogger(__name__)


@dataclass
class SampleLater:
    """A decode step whose forward pass is launched and whose sampling waits for the tokens in flight to reach
    the host (see the module docstring)."""

    requests: Sequence
    logits: torch.Tensor


class StepsAhead:
    def __init__(self, runner: ModelRunner, enabled: bool):
        self.runner = runner
        self.enabled = enabled
        self.pending: List[PendingChoices] = []  # launched, not read yet

    def in_flight(self, requests: Sequence) -> bool:
        """Whether any of these requests has a step launched ahead that was not read yet."""
        launched = self.launched()
        return any(id(r) in launched for r in requests)

    def launched(self) -> set:
        return {id(r) for step in self.pending for r in step.requests}

    def launch(self, requests: Sequence) -> None:
        """Launches the next decode step of these requests (those without one in flight already)."""
        launched = self.launched()
        step = self.decode_step([r for r in requests if id(r) not in launched]) if self.enabled else None
        if step is not None:
            self.pending.append(step)

    def follow(self, requests: Sequence) -> Optional[Union[PendingChoices, SampleLater]]:
        """The decode step after the ones in flight, for these requests (each must have one in flight: the same
        batch, a batch the router concatenated from several, or one it filtered), fed with the tokens those
        steps chose on the device, for the requests that surely get one more token; the caller passes it to
        `add` once it has read the steps before. Its sampling waits for that read when a request has a grammar
        (SampleLater). None when a request has no step in flight or needs its token on the host before its
        forward pass (a watermark, or penalty counts still to be built)."""
        if not self.enabled or not self.pending or any(step.device_tokens is None for step in self.pending):
            return None
        where, offset = {}, 0  # request -> its row in the in-flight steps' tokens, side by side
        for step in self.pending:
            where.update((id(r), offset + j) for j, r in enumerate(step.requests))
            offset += len(step.requests)
        sampler = self.runner.sampler
        if any(id(r) not in where for r in requests) or not all(sampler.can_sample_later(r) for r in requests):
            return None
        going = [r for r in requests if len(r.generated) + 1 < r.max_new_tokens]
        if not going:
            return None
        steps = [step.device_tokens for step in self.pending]
        tokens = steps[0] if len(steps) == 1 else torch.cat(steps)
        rows = [where[id(r)] for r in going]
        if rows != list(range(len(tokens))):
            # to_device: a blocking copy (torch.tensor(device=)) would wait for the steps in flight
            tokens = tokens.index_select(0, to_device(rows, torch.int64, tokens.device))
        return self.decode_step(going, tokens, sample_now=all(sampler.can_follow(r) for r in going))

    def add(self, step: Union[PendingChoices, SampleLater]) -> None:
        """Puts `follow`'s step in flight, once the steps before it were read (`collect`): a SampleLater step's
        sampling is launched now, its grammars having taken those steps' tokens. Should that read have fallen
        back to per-request sampling, penalty counts are to be rebuilt from the host's sequence, which has the
        token only once the step's results are made: those rows then sample alone at the next read too."""
        if isinstance(step, SampleLater):
            if all(self.runner.sampler.can_sample_later(r) for r in step.requests):
                step = self.runner.start(step.requests, step.logits)
            else:
                step = PendingChoices(step.requests, step.logits, None)
        self.pending.append(step)

    def decode_step(self, requests: Sequence, input_ids: Optional[torch.Tensor] = None,
                    sample_now: bool = True) -> Optional[Union[PendingChoices, SampleLater]]:
        """One decode step of these requests, launched (None for none, or when it failed: the next decode runs
        it again, and answers for the failure); with `sample_now` False only its forward pass."""
        if not requests:
            return None
        try:
            logits = self.runner.forward([r.seq for r in requests], [1] * len(requests), prefill=False,
                                         input_ids=input_ids)
        except Exception:
            logger.exception("a decode step launched ahead failed; the next decode step runs it again")
            return None
        return self.runner.start(requests, logits) if sample_now else SampleLater(requests, logits)

    def collect(self) -> bool:
        """Reads the choices of every step in flight (one host synchronisation each) into its requests. Returns
        whether a read fell back to per-request sampling after the batched launch: a step `follow` launched from
        the device's tokens then fed other tokens than those chosen, and must not be added (the next step is
        launched again from the host's, and writes the same cache slots)."""
        pending, self.pending = self.pending, []
        dropped = False
        for step in pending:
            for r, choice in zip(step.requests, step.collect()):
                r.ahead = choice
            dropped |= step.device_tokens_dropped
        return dropped

    def discard(self, step: Union[PendingChoices, SampleLater]) -> None:
        """Takes back a step `follow` launched but that must not be added (`collect`): its requests' sequences
        no longer count its position as cached, so their next step runs it again, from the host's tokens, and
        writes over its cache slots (stream order)."""
        for r in step.requests:
            r.seq.cached -= 1

    def drop(self) -> None:
        """Forgets every step in flight (no request is left to read them); the GPU finishes them, and stream
        order keeps that safe."""
        self.pending = []
