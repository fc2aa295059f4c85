"""Batched choice of the next token: one step over the batch's last-position logits, one host sync.

Dimensions: B rows (one per request), V the vocabulary (the logits' width), P rows with penalties,
S sampled rows, K the most alternatives a row asks for, C the columns of the parameter table.

Every row gets what the per-request oracle (`lorax_server.utils.tokens.NextTokenChooser`) gives it, in
its order: watermark bias, penalties (repetition, frequency, presence), temperature, top-k, top-p,
typical-p, then the argmax of the final scores (greedy rows) or a draw from the request's own generator
(sampled rows). The draw is the exponential race argmax(p / q), q ~ Exp(1) drawn from that generator
over the whole row: torch.multinomial(p, 1, generator) computes exactly this for one sample (ATen's
one-sample path), so a seed draws the oracle's tokens, without multinomial's checks on the host.
Divisions round as the oracle's division by a Python float does on each device (`divide`), so the two
agree bit for bit: on the CPU in the tests, and on an H200 (torch 2.11, V = 32000, 1280 draws of mixed
controls; its 1-D and batched scans round alike there too).

State between steps lives in each request (`SamplerRow`): its chooser (parameters, seed, generator,
watermark) and, when it has penalties, `counts` [V]: how often each token occurs in its sequence, on the
device. They are built from the sequence at the request's first step and then grow by the chosen token;
each is a row of that step's [P, V] tensor, so the counts follow their request through filter and
concatenate with no bookkeeping, and the next step stacks them again.

A structured-output row (its request has a `grammar`, engine.grammar) first has the tokens its grammar
does not allow next set to -inf, so its penalties, warpers and draw only ever see allowed tokens: the masks
are built on the host and reach the device in one copy (mask_logits), and after the sync each grammar takes
its row's chosen token. A batch without such rows runs exactly as before.

A row whose values are not finite (NaN logits from a broken adapter, an overflow) has a non-finite
log-probability for its token: the caller reads that in the same sync and ends the request alone.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Sequence, Tuple

import torch

from lorax_server.engine.grammar import GrammarState, mask_logits
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams

NEG_INF = float("-inf")
INF = float("inf")

# Columns of the parameter table [B, C]. A row that does not use a control holds the value that leaves it
# unchanged: temperature 1, top-k 0, top-p and typical-p +inf (no mass reaches it), penalties 1, 0, 0.
# The divisors come with their reciprocals, rounded from float64 as CUDA's division by a host scalar is.
TEMPERATURE, INV_TEMPERATURE, TOP_K, TOP_P, TYPICAL_P, REPETITION, INV_REPETITION, FREQUENCY, PRESENCE = range(9)

NON_FINITE = "the logits of this step are not finite (NaN or infinity), so no token can be chosen"


class SamplerRow(Protocol):
    """What the sampler reads and keeps per request (the engine's Request is one)."""

    chooser: NextTokenChooser  # parameters, seed, generator, watermark
    counts: Optional[torch.Tensor]  # [V] on the device; kept here for requests with penalties
    # grammar: Optional[GrammarState], read with getattr (absent means None): a structured-output request's
    # place in its JSON schema (engine.grammar)

    @property
    def tokens(self) -> Sequence[int]:  # the sequence so far: prompt and generated tokens
        ...


@dataclass
class Choice:
    """One row's result: the token, its log-probability in the final distribution, the best `k` tokens."""

    token: int
    logprob: float
    alternatives: List[Tuple[int, float]] = field(default_factory=list)
    error: Optional[str] = None  # set when the row was not finite: its request ends alone


def penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def table_row(p: SamplingParams, vocab: int) -> List[float]:
    """The parameter table's row for `p`, with the oracle's conditions for applying each control."""
    row = [1.0, 1.0, 0.0, INF, INF, p.repetition_penalty, 1 / p.repetition_penalty, p.frequency_penalty,
           p.presence_penalty]
    if p.temperature not in (0.0, 1.0):
        row[TEMPERATURE], row[INV_TEMPERATURE] = p.temperature, 1 / p.temperature
    if 0 < p.top_k < vocab:
        row[TOP_K] = p.top_k
    if p.top_p < 1:
        row[TOP_P] = p.top_p
    if p.typical_p < 1:
        row[TYPICAL_P] = p.typical_p
    return row


@dataclass
class StepPlan:
    """What one step does, read from the rows' parameters on the host (no device value is needed)."""

    vocab: int
    params: List[SamplingParams]  # [B]
    table: List[List[float]]  # [B, C]
    watermarked: List[int]
    penalised: List[int]
    sampled: List[int]
    alternatives: List[int]  # per row: how many alternatives it reports
    max_top_k: int

    @classmethod
    def of(cls, rows: Sequence[SamplerRow], vocab: int) -> "StepPlan":
        params = [r.chooser.params for r in rows]
        table = [table_row(p, vocab) for p in params]
        return cls(
            vocab=vocab,
            params=params,
            table=table,
            watermarked=[i for i, r in enumerate(rows) if r.chooser.watermark is not None],
            penalised=[i for i, p in enumerate(params) if penalised(p)],
            sampled=[i for i, p in enumerate(params) if p.samples],
            alternatives=[min(p.return_k_alternatives, vocab) for p in params],
            max_top_k=int(max(row[TOP_K] for row in table)),
        )

    @property
    def greedy_only(self) -> bool:
        """No row samples, is penalised or watermarked; warpers only ever apply to sampled rows."""
        return not (self.sampled or self.penalised or self.watermarked)

    def uses(self, column: int) -> bool:
        unused = {TEMPERATURE: 1.0, TOP_K: 0.0, TOP_P: INF, TYPICAL_P: INF}[column]
        return any(row[column] != unused for row in self.table)


class BatchSampler:
    """Chooses one token per row of a batch; `step` synchronises with the device once."""

    def __init__(self, device):
        self.device = torch.device(device)
        # The last plan's upload and the parameters it was made from: a decode step usually has the same
        # requests as the one before, and a copy to the device costs about 0.1 ms of host time (H200 here).
        self.uploaded: Tuple[int, List[SamplingParams], Tuple[torch.Tensor, ...]] = (0, [], ())

    def step(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> List[Choice]:
        """logits [B, V] (the rows' last positions, any float dtype; never written) -> one Choice per row.
        Sampled rows advance their generators; penalised rows' `counts` take the chosen tokens; constrained
        rows choose among the tokens their grammar allows, and their grammars advance by the chosen token."""
        return self.launch(logits, rows).collect()

    @staticmethod
    def can_follow(row: SamplerRow) -> bool:
        """Whether this row's next step, forward pass and sampling, can be launched before its last token reaches
        the host (`can_sample_later` rows need their sampling launched after it does)."""
        return BatchSampler.can_sample_later(row) and getattr(row, "grammar", None) is None

    @staticmethod
    def can_sample_later(row: SamplerRow) -> bool:
        """Whether this row's next forward pass can be launched before its last token reaches the host, with its
        sampling launched once the token is read. A grammar has taken the token by then (its mask is built at
        the launch); a watermark and penalty counts not built yet read the host's sequence, which gets the token
        only after the step's results are made (counts already built take it on the device)."""
        return row.chooser.watermark is None and (row.counts is not None or not penalised(row.chooser.params))

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> "LaunchedStep":
        """`step` without its wait: the choice is queued on the device and copied to pinned host memory;
        `collect()` waits for the copy (the one synchronisation) and reads it."""
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if getattr(r, "grammar", None) is not None]
        if constrained:  # built on the host while the device may still run the forward pass
            logits = mask_logits(logits, constrained)
        vocab = logits.shape[-1]
        plan = StepPlan.of(rows, vocab)
        if plan.greedy_only:
            tokens = logits.argmax(-1)  # [B]; argmax of bf16 logits is that of their exact fp32 values
            logprobs = torch.log_softmax(logits, -1, dtype=torch.float32)  # [B, V]
        else:
            tokens, logprobs = self.choose(logits, rows, plan)
        k = max(plan.alternatives, default=0)
        return LaunchedStep(to_host(pack(tokens, logprobs, k)), k, plan.alternatives, constrained, tokens)

    def choose(self, logits: torch.Tensor, rows: Sequence[SamplerRow], plan: StepPlan):
        """The full path: (tokens [B], final log-distribution [B, V])."""
        table, sampled, penalised = self.upload_plan(plan)  # [B, C], [S], [P]
        scores = logits.float()  # [B, V]; the logits themselves when fp32, so only out-of-place ops below
        if plan.watermarked:
            scores = scores + watermark_bias(scores, rows, plan.watermarked)
        if plan.penalised:
            counts = self.stacked_counts([rows[i] for i in plan.penalised], scores.shape[-1])  # [P, V]
            scores = penalise(scores, counts, penalised, table)
        scores = warp(scores, table, plan)
        logprobs = scores.log_softmax(-1)  # [B, V]
        tokens = scores.argmax(-1)  # [B]; the sampled rows' are replaced next
        if plan.sampled:
            drawn = race(logprobs.index_select(0, sampled).exp(), [rows[i].chooser.generator for i in plan.sampled])
            tokens = tokens.index_copy(0, sampled, drawn)
        if plan.penalised:
            count_chosen(counts, tokens.index_select(0, penalised))
            for j, i in enumerate(plan.penalised):
                rows[i].counts = counts[j]
        return tokens, logprobs

    def upload_plan(self, plan: StepPlan) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parameter table [B, C] and the sampled [S] and penalised [P] rows' indices, in one copy
        (indices below 2^24 are exact in float32), or none when the rows' parameters are the last step's
        (the same objects: SamplingParams is frozen)."""
        vocab, last, uploaded = self.uploaded
        if vocab == plan.vocab and len(last) == len(plan.params) and all(a is b for a, b in zip(last, plan.params)):
            return uploaded
        b, c = len(plan.table), len(plan.table[0])
        flat = [v for row in plan.table for v in row] + plan.sampled + plan.penalised
        values = self.upload(flat, torch.float32)
        table = values[:b * c].view(b, c)
        indices = values[b * c:].long()
        uploaded = table, indices[:len(plan.sampled)], indices[len(plan.sampled):]
        self.uploaded = (plan.vocab, plan.params, uploaded)
        return uploaded

    def stacked_counts(self, rows: Sequence[SamplerRow], vocab: int) -> torch.Tensor:
        """The rows' token counts [P, V]; a row seen for the first time is counted from its sequence."""
        new = [r for r in rows if r.counts is None]
        if new:
            for r, row_counts in zip(new, self.count(new, vocab)):
                r.counts = row_counts
        return torch.stack([r.counts for r in rows])

    def count(self, rows: Sequence[SamplerRow], vocab: int) -> torch.Tensor:
        """[N, V] counts of each row's tokens, from one upload of all of them (ids past V are not logits)."""
        ids = [(j, t) for j, r in enumerate(rows) for t in r.tokens if t < vocab]
        counts = torch.zeros(len(rows), vocab, device=self.device)
        if ids:
            where = self.upload(ids, torch.int64)  # [T, 2]: (row, token)
            counts.index_put_((where[:, 0], where[:, 1]), torch.ones(len(ids), device=self.device), accumulate=True)
        return counts

    def upload(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Host values on the device without a host sync: a plain copy to a GPU waits for it, one from
        pinned memory is queued (torch's caching host allocator keeps the buffer until the copy is done)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)


def to_host(values: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """An asynchronous copy to the host and the event that marks its end (None: the values are there now)."""
    if values.device.type != "cuda":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


@dataclass
class LaunchedStep:
    """A step's choices on their way to the host (BatchSampler.launch)."""

    copy: Tuple[torch.Tensor, Optional["torch.cuda.Event"]]  # [B, 2 + 2k] values and the end of their copy
    k: int
    alternatives: List[int]
    constrained: Sequence[Tuple[int, "GrammarState"]]
    tokens: torch.Tensor  # [B] int64 on the device: the chosen tokens, which a following step may read there

    def collect(self) -> List[Choice]:
        values, done = self.copy
        if done is not None:
            done.synchronize()  # the one sync
        choices = [unpack(row, self.k, n) for row, n in zip(values.tolist(), self.alternatives)]
        if self.constrained:
            advance_grammars(choices, self.constrained)
        return choices


def advance_grammars(choices: List[Choice], constrained: Sequence[Tuple[int, GrammarState]]) -> None:
    """Each constrained row's grammar takes its chosen token; a row whose grammar refused a token (this one
    or an earlier one) carries the grammar's reason and ends alone."""
    for i, state in constrained:
        choice = choices[i]
        if choice.error is None:
            state.accept(choice.token)
        if state.error is not None:
            choice.error = state.error


def penalise(scores: torch.Tensor, counts: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Repetition, frequency and presence penalties on the rows `index` [P] with their counts [P, V], as
    the oracle's `penalise`: scores [B, V] -> [B, V]."""
    params = table.index_select(0, index)  # [P, C]
    sub = scores.index_select(0, index)  # [P, V]
    seen = counts > 0
    repetition = params[:, REPETITION:REPETITION + 1]  # [P, 1]
    sub = torch.where(seen, torch.where(sub > 0, divide(sub, params, REPETITION), sub * repetition), sub)
    sub = sub - params[:, FREQUENCY:FREQUENCY + 1] * counts - params[:, PRESENCE:PRESENCE + 1] * seen.to(sub.dtype)
    return scores.index_copy(0, index, sub)


def watermark_bias(scores: torch.Tensor, rows: Sequence[SamplerRow], which: List[int]) -> torch.Tensor:
    """[B, V]: each watermarked row's delta on the green list of its previous token, zeros elsewhere."""
    bias = torch.zeros_like(scores)
    for i in which:  # one permutation per row: its seed is the row's previous token
        watermark = rows[i].chooser.watermark
        green = watermark.green_ids(rows[i].tokens[-1], scores.shape[-1], scores.device)
        bias[i].index_fill_(0, green, watermark.delta)
    return bias


def divide(x: torch.Tensor, table: torch.Tensor, column: int) -> torch.Tensor:
    """x [R, V] / the table's `column` [R, C], rounded as the oracle's x / python_float is on x's device:
    CUDA multiplies by the host scalar's float64 reciprocal rounded to float32 (ATen's div_true_kernel_cuda),
    the CPU divides by the scalar rounded to float32. Column + 1 holds the reciprocal."""
    if x.device.type == "cuda":
        return x * table[:, column + 1:column + 2]
    return x / table[:, column:column + 1]


def warp(scores: torch.Tensor, table: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p, each only when a row uses it; [B, V] -> [B, V]."""
    if plan.uses(TEMPERATURE):
        scores = divide(scores, table, TEMPERATURE)
    if plan.uses(TOP_K):
        scores = top_k_rows(scores, table[:, TOP_K], plan.max_top_k)
    if plan.uses(TOP_P):
        scores = top_p_rows(scores, table[:, TOP_P:TOP_P + 1])
    if plan.uses(TYPICAL_P):
        scores = typical_rows(scores, table[:, TYPICAL_P:TYPICAL_P + 1])
    return scores


def top_k_rows(scores: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """k [B] (0: off, else below V) -> scores with every logit below the row's k-th largest at -inf
    (ties with the k-th are kept, as transformers' TopKLogitsWarper keeps them)."""
    top = scores.topk(max_k, dim=-1).values  # [B, max_k], descending
    kth = top.gather(1, (k.clamp(min=1) - 1).long()[:, None])  # [B, 1]
    kth = kth.masked_fill(k[:, None] == 0, NEG_INF)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_rows(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p [B, 1] -> keeps each row's smallest set of best tokens whose probability reaches top_p."""
    ordered, order = scores.sort(dim=-1, descending=True)  # [B, V]
    probs = ordered.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
    return scores.scatter(-1, order, ordered.masked_fill(outside, NEG_INF))


def typical_rows(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """mass [B, 1] -> keeps the tokens whose surprise is closest to the row's entropy, up to `mass`."""
    logp = scores.log_softmax(-1)  # [B, V]
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)  # [B, 1]
    order = (-logp - entropy).abs().argsort(dim=-1)  # [B, V], most typical first
    probs = logp.gather(-1, order).exp()
    outside = probs.cumsum(-1) - probs >= mass
    return scores.scatter(-1, order, scores.gather(-1, order).masked_fill(outside, NEG_INF))


def race(probs: torch.Tensor, generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """probs [S, V] -> [S] one draw per row from its own generator: argmax(p / q), q ~ Exp(1), which is
    torch.multinomial(p, 1, generator) draw for draw. One launch per row: a generator is one stream."""
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators):
        row.exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def count_chosen(counts: torch.Tensor, tokens: torch.Tensor) -> None:
    """counts [P, V] += one-hot(tokens [P]), in place."""
    rows = torch.arange(len(tokens), device=counts.device)
    counts.index_put_((rows, tokens), torch.ones(len(tokens), device=counts.device), accumulate=True)


def pack(tokens: torch.Tensor, logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 2 + 2k] float64: token, its logprob, then k alternative ids and their logprobs (ids below 2^53
    are exact in float64), so that one copy brings the whole step to the host."""
    chosen = logprobs.gather(1, tokens[:, None])  # [B, 1]
    parts = [tokens[:, None].double(), chosen.double()]
    if k:
        top = logprobs.topk(k, dim=-1)  # [B, k]
        parts += [top.indices.double(), top.values.double()]
    return torch.cat(parts, dim=1)


def unpack(values: List[float], k: int, wanted: int) -> Choice:
    """One row of `pack`'s result; `wanted` of its k alternatives are this row's."""
    token, logprob = int(values[0]), values[1]
    if not math.isfinite(logprob):
        return Choice(token, logprob, error=NON_FINITE)
    ids, logprobs = values[2:2 + wanted], values[2 + k:2 + k + wanted]
    return Choice(token, logprob, [(int(i), lp) for i, lp in zip(ids, logprobs)])
