"""The engine's front: continuous batching of requests over the paged KV cache, as LoRAX's shard service drives it.

A batch is a list of live requests (`engine.requests`). `prefill` admits new requests, runs every prompt
in one packed forward pass and chooses each request's first token; `decode` runs one token for every
request of one or more cached batches (concatenated); finished requests leave their batch and give their
blocks back at once; `filter` keeps only the requests the router still wants. One step runs at a time
(the server holds a lock).

The forward pass and the choice of tokens are the runner's (`engine.runner`: packing into one typed
batch, adapter data, CUDA graphs, batched sampling with one host synchronisation); the engine then turns
each token into text (`engine.text`: one incremental decode per token) and checks its stop conditions.

Each request reserves the blocks for its prompt and all its new tokens when it is admitted (or takes the
blocks the router allocated for it), so a decode step never runs out of cache mid-generation: a batch
that could not fit is refused up front, one request at a time.

Prefix caching and chunked prefill are upstream's (the router drives both; see ../shared/LORAX_ROUTER.md):
a request whose router blocks already hold its first `cache_len` prompt tokens prefills only the rest, the
blocks shared by reference count (`engine.cache`); a request with `chunk_len` prefills that much of its
prompt, and the batch's following steps (`prefill_step`) run the rest chunk by chunk beside the next tokens
of its other requests. Without the router's blocks the engine caches no prefix of its own, as upstream's
shard (whose prefix cache is the router's radix trie). A request that fails on its own (its sampler, its text) ends
alone with an error result; its batch-mates go on.
"""

import itertools
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lorax_server.adapters.store import AdapterStore
from lorax_server.adapters.weights import AdapterError
from lorax_server.engine.cache import BlockInUse, CacheFull, PagedKVCache, PagedSequence
from lorax_server.engine.grammar import GrammarCompiler
from lorax_server.engine.requests import DEFAULT_BLOCK_SIZE, Batch, BatchNotFound, Request, StepResult, TokenChoice
from lorax_server.engine.pipeline import StepsAhead
from lorax_server.engine.runner import PLAIN_WARM_UP, ModelRunner, to_device
from lorax_server.engine.sampler import Choice
from lorax_server.engine.text import CONTEXT_TOKENS, final_text, incremental_decoder
from lorax_server.models.merge_adapter import merge_into
from lorax_server.utils.errors import RequestError
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams, StoppingCriteria

logger = logging.getLogger(__name__)

# LoRAX's router keeps block 0 for its liveness probe ("Block 0 is reserved for health checks",
# router/src/block_allocator.rs) and may send the probe while batches are live: no request of ours gets it.
PROBE_BLOCK = 0


class FlashCausalLM:
    def __init__(self, model, tokenizer, dtype: torch.dtype, device, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_dtype: Optional[torch.dtype] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype  # torch.float8_e4m3fn: the FP8 KV cache
        self.device = torch.device(device)
        self.config = model.config
        self.cache = PagedKVCache(self.config.num_hidden_layers, num_blocks, block_size, model.num_kv_heads,
                                  model.head_dim, self.kv_cache_dtype, device, reserved=(PROBE_BLOCK,))
        eos = self.config.eos_token_id
        self.eos_token_ids = eos if isinstance(eos, list) else [eos]
        self.adapters = AdapterStore(self.config, model.lm_head.process_group, dtype, device, base_model=model)
        self.batches: Dict[int, Batch] = {}
        self.batch_ids = itertools.count(1 << 32)  # ids of batches made here (the router numbers its own below)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []))
        self.token_texts: Dict[int, str] = {}  # token id -> its text alone (alternatives, prompt tokens)
        self.grammars = GrammarCompiler(tokenizer, self.config.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(model, self.cache, self.adapters, self.device)
        self.steps_ahead = StepsAhead(self.runner, decode_ahead_default(self.device))
        # Chunked prefill: the prompt tokens one prefill step may run (Warmup's max_prefill_tokens, as upstream's
        # set_max_prefill_tokens); None: a prompt prefilled in chunks runs all the rest at its next step.
        self.max_prefill_tokens: Optional[int] = None
        # Chunked prefill is served where the router allocates the blocks (no sliding window: see
        # server.LoraxService.Info): only then does it send chunk_len. CHUNKED_PREFILL is upstream's switch, which
        # LoRAX's launcher sets from --chunked-prefill (launcher/src/main.rs:849-852). Prefix caching needs no
        # switch here: the router's --prefix-caching sends cache_len, which is always honoured.
        self.chunked_prefill = env_flag("CHUNKED_PREFILL") and self.config.sliding_window is None
        self.kernels_warm = False  # warm_up_kernels has run (it writes free blocks: once, before prefixes are cached)

    @property
    def decode_ahead(self) -> bool:
        """Whether decode steps are launched ahead of their Decode call (`engine.pipeline`)."""
        return self.steps_ahead.enabled

    @decode_ahead.setter
    def decode_ahead(self, enabled: bool) -> None:
        self.steps_ahead.enabled = enabled

    @property
    def graphs(self):
        """The decode CUDA graphs (None: decode steps run eagerly)."""
        return self.runner.graphs

    @graphs.setter
    def graphs(self, graphs) -> None:
        self.runner.graphs = graphs

    # -- admission -----------------------------------------------------------------------------------

    def tokenize(self, text: str, token_ids: Sequence[int], truncate: int) -> List[int]:
        """The prompt's ids (`token_ids` when given, else `text` tokenized), keeping the last `truncate`
        (0: all). The router sends truncate = max_input_length by default: longer than the prompt is a no-op."""
        ids = list(token_ids) if token_ids else self.tokenizer(text)["input_ids"] if text else []
        if not ids:
            raise RequestError("the request has no input: both inputs and tokenized_inputs are empty")
        if truncate:
            ids = ids[-truncate:]
        vocab = self.config.vocab_size
        if max(ids) >= vocab:
            raise RequestError(f"token id {max(ids)} is outside the vocabulary of {vocab}")
        return ids

    def new_request(self, request_id: int, ids: List[int], params: SamplingParams, max_new_tokens: int,
                    stop_sequences=(), ignore_eos=False, adapter_index=0, prefill_logprobs=False,
                    schema: Optional[str] = None, cache_len: int = 0, chunk_len: Optional[int] = None) -> Request:
        """A request ready for admission; `schema` (a JSON schema) constrains its output to JSON valid against
        it (RequestError when the schema cannot be served). `cache_len`: prompt tokens already in the blocks the
        router gives it (prefix caching); `chunk_len`: prompt tokens its first prefill step runs (chunked prefill,
        the rest follows in later steps)."""
        limit = self.config.max_position_embeddings
        if len(ids) + max_new_tokens > limit:
            raise RequestError(f"{len(ids)} input tokens + {max_new_tokens} new tokens exceed the model's "
                               f"{limit} positions")
        if not 0 <= cache_len < len(ids):
            raise RequestError(f"cache_len {cache_len} must leave at least one of the {len(ids)} prompt tokens "
                               f"to prefill")
        if chunk_len is not None and not 0 < chunk_len <= len(ids) - cache_len:
            raise RequestError(f"chunk_len {chunk_len} must be between 1 and the {len(ids) - cache_len} prompt "
                               f"tokens past cache_len {cache_len}")
        stopping = StoppingCriteria(max_new_tokens, self.eos_token_ids, stop_sequences, ignore_eos)
        seq = PagedSequence(list(ids), adapter_index)  # its own list: generated tokens are appended to it
        grammar = self.grammars.state(schema) if schema is not None else None
        return Request(request_id, seq, len(ids), NextTokenChooser(params, self.device), stopping, max_new_tokens,
                       prefill_logprobs, grammar=grammar, cache_len=cache_len,
                       next_chunk=None if chunk_len is None else cache_len + chunk_len)

    def admit(self, requests: List[Request], router_blocks: Dict[int, List[int]]) -> Tuple[List[Request], List[StepResult]]:
        """Reserves each request's blocks, in order: the router's blocks when it allocated them (exactly those:
        the router owns every other block id), else blocks of our own. Returns (admitted, results of the
        refused): a request that cannot be served (adapter not loaded, cache full, bad blocks) ends alone."""
        admitted, refused = [], []
        for r in requests:
            try:
                self.admit_one(r, router_blocks.get(r.id))
                admitted.append(r)
            except (RequestError, AdapterError, CacheFull, BlockInUse) as error:
                self.release([r])  # whatever it claimed before the refusal goes back
                refused.append(self.failed(r.id, str(error)))
        return admitted, refused

    def admit_one(self, r: Request, blocks: Optional[List[int]]) -> None:
        self.adapters.check_loaded([r.seq.adapter_index])
        if blocks is not None and len(blocks) < self.cache.blocks_for(r.cache_tokens):
            raise RequestError(f"{len(blocks)} blocks cannot hold its {r.cache_tokens} tokens in blocks of "
                               f"{self.cache.block_size}")
        needed = self.cache.blocks_for(r.cache_tokens) if blocks is None else 0
        if needed > len(self.cache.free_blocks):
            raise CacheFull(f"it needs {needed} cache blocks of {self.cache.block_size} tokens, "
                            f"{len(self.cache.free_blocks)} are free of {self.cache.num_blocks}")
        if blocks is not None:
            r.seq.blocks = self.cache.claim(blocks, shared=self.cache.blocks_for(r.cache_len))
            self.skip_cached_prefix(r)
        r.seq.reserve(self.cache, r.cache_tokens)
        if r.next_chunk is not None:
            r.next_chunk -= r.seq.cached  # it was counted from position 0: the first chunk ends where the router said

    def skip_cached_prefix(self, r: Request) -> None:
        """Prefix caching: the prompt's first `cache_len` tokens are not prefilled again where its blocks really
        hold them (`PagedKVCache.cached_prefix`); the blocks it writes forget what they held."""
        r.seq.cached = self.cache.cached_prefix(r.seq, r.cache_len)
        if r.seq.cached < r.cache_len:
            stale = r.seq.blocks[r.seq.cached // self.cache.block_size:self.cache.blocks_for(r.cache_len)]
            readers = [b for b in stale if self.cache.refs[b] > 1]
            if readers:  # prefilling again would write other tokens' K/V under a live request that reads them
                raise RequestError(f"blocks {readers} do not hold the {r.cache_len} cached prefix tokens the router "
                                   f"sent, and another live request holds them")
            logger.warning("request %d: its blocks hold %d of the %d prefix tokens the router says are cached; "
                           "the rest is prefilled again", r.id, r.seq.cached, r.cache_len)
        self.cache.forget(r.seq.blocks[r.seq.cached // self.cache.block_size:])

    def release(self, requests: Sequence[Request]) -> None:
        for r in requests:
            self.cache.free(r.seq.blocks)
            r.seq.blocks = []
            r.ahead = None

    # -- steps ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, batch_id: int, requests: List[Request], router_blocks=None,
                cached_batch_id: Optional[int] = None) -> Tuple[List[StepResult], Optional[Batch]]:
        """Admits the requests and runs their first prefill step (the whole prompt, or its first chunk), choosing
        the first token of each request whose prompt is then complete. A request that cannot be admitted ends
        alone (its result says why); if the forward pass itself fails, the admitted requests leave no trace.

        `cached_batch_id` (chunked prefill, as upstream's Prefill with `cached_batch`): the new requests join
        that batch, and the same forward pass runs the next chunk or the next token of each of its requests;
        the batch keeps its id. Should that step fail, the cached batch is gone too (upstream popped it)."""
        if not requests and cached_batch_id is None:
            raise RequestError("a batch needs at least one request")
        if batch_id in self.batches:
            raise RequestError(f"batch {batch_id} already exists")
        if cached_batch_id is not None and cached_batch_id not in self.batches:
            raise BatchNotFound(f"batch {cached_batch_id} is not in the cache")
        requests, refused = self.admit(requests, router_blocks or {})
        if cached_batch_id is None:
            if not requests:
                return refused, None
            batch = Batch(batch_id, requests, self.cache.block_size)
        else:
            batch = self.batches.pop(cached_batch_id)
            batch.requests = batch.requests + requests
        try:
            results = self.prefill_step(batch.requests)
        except Exception:
            self.release(batch.requests)
            raise
        return refused + results, self.keep(batch)

    @torch.no_grad()
    def decode(self, batch_ids: Sequence[int]) -> Tuple[List[StepResult], Optional[Batch]]:
        """One token for every request of these batches (merged into the first); while a request of theirs is
        still prefilled in chunks, the step runs its next chunk alongside (`prefill_step`)."""
        batch = self.concatenate(batch_ids)
        try:
            if any(r.prefilling for r in batch.requests):
                results = self.prefill_step(batch.requests)
            else:
                results = self.finish_step(batch.requests, self.next_choices(batch.requests))
        except Exception:
            # Half a step cannot be resumed: the batch is dropped and its blocks freed; other batches are untouched.
            self.clear(batch.id)
            raise
        return results, self.keep(batch)

    def prefill_step(self, requests: List[Request]) -> List[StepResult]:
        """One packed forward pass in which every request still prefilling runs its next chunk of prompt and
        every other request its next token (unless a step launched ahead already chose it). Results come for
        the requests that chose a token: a request whose prompt is not complete yet has none (as upstream)."""
        if self.steps_ahead.in_flight(requests):
            self.steps_ahead.collect()
        run, defer_chunks = self.this_pass(requests)
        if run:
            counts = [r.chunk if r.prefilling else 1 for r in run]
            starts = [r.seq.cached for r in run]
            want_all = any(r.prefilling and r.prefill_logprobs for r in run)
            logits = self.runner.forward([r.seq for r in run], counts, prefill=True, all_logits=want_all)
            rows = list(logits.split(counts)) if want_all else None
            last = torch.stack([row[-1] for row in rows]) if want_all else logits
            wanted = []
            for i, (r, start) in enumerate(zip(run, starts)):
                if start < r.prompt_length:
                    self.cache.record(r.seq, min(r.seq.cached, r.prompt_length))
                    if r.prefill_logprobs:
                        wanted.append((r, start, rows[i]))
            if wanted:
                self.add_prompt_logprobs(wanted)
            ready = [i for i, r in enumerate(run) if not r.prefilling]
            if ready:
                index = to_device(ready, torch.int64, last.device)  # torch.tensor(device=) would wait for the GPU
                chosen = [run[i] for i in ready]
                for r, choice in zip(chosen, self.runner.sample(chosen, last.index_select(0, index))):
                    r.ahead = choice
        going = [r for r in requests if not r.prefilling]
        choices = [r.ahead for r in going]
        for r in going:
            r.ahead = None
        # While a request still prefills, the next step runs its chunk and every other request's token in one
        # forward pass; a decode step launched ahead would make that two passes over the weights (measured on
        # an H200: a 256-token chunk beside 32 decodes took 57 ms of GPU time, 44 of them in the experts).
        results = self.finish_step(going, choices, launch_ahead=not any(r.prefilling for r in requests))
        if not defer_chunks:  # a deferred chunk stays as the router sized it (chunk_len)
            self.plan_chunks(requests)
        return results

    def this_pass(self, requests: List[Request]) -> Tuple[List[Request], bool]:
        """The requests this step's forward pass runs, and whether the prompts' chunks wait for the next pass.

        They wait when every decoding request already has this step's token from a step launched ahead (a
        Prefill with a cached batch that was decoding): run now, the chunks would be a pass over the weights of
        their own, which the next call, computing the decodes' next token, would wait for (measured on an H200:
        the call after such a lone chunk took 52-60 ms against 36-42). A deferred chunk may then meet the next
        Prefill's in one pass, which the router budgeted apart (its eager prefill keeps one budget for
        back-to-back Prefills): that pass is planned to one budget, the newest requests first."""
        decoding = [r for r in requests if not r.prefilling]
        defer = bool(decoding) and all(r.ahead is not None for r in decoding)
        run = [r for r in requests if (r.prefilling and not defer) or (not r.prefilling and r.ahead is None)]
        was_deferred = any(r.deferred for r in requests if r.prefilling)
        for r in requests:
            r.deferred = defer and r.prefilling
        if was_deferred and not defer and self.step_tokens(run) > (self.max_prefill_tokens or math.inf):
            self.plan_chunks(requests)
        return run, defer

    @staticmethod
    def step_tokens(run: List[Request]) -> int:
        return sum(r.chunk if r.prefilling else 1 for r in run)

    def plan_chunks(self, requests: List[Request]) -> None:
        """The next chunk of each request still prefilling, as upstream sizes it after a prefill step
        (server/lorax_server/models/flash_causal_lm.py:1648-1675): the newest requests first, from Warmup's
        max_prefill_tokens less one token for each other request, and at least one token each."""
        if self.max_prefill_tokens is None:
            return  # no budget known: each runs the rest of its prompt next
        budget = self.max_prefill_tokens - (len(requests) - 1)
        for r in reversed(requests):
            if r.prefilling and r.finish_reason is None:
                r.next_chunk = max(min(r.prompt_length - r.seq.cached, budget), 1)
                budget -= r.next_chunk

    def add_prompt_logprobs(self, wanted: List[Tuple[Request, int, torch.Tensor]]) -> None:
        """For each (request, start, logits [n, V] of its tokens start..start+n-1): adds the log-probabilities of
        the prompt tokens those logits predict, read in one host synchronisation for the whole step. The first
        token, and those read from the prefix cache, have none (NaN, as upstream)."""
        picked, counts = [], []
        for r, start, logits in wanted:
            if r.prompt_logprobs is None:
                r.prompt_logprobs = [math.nan] * (start + 1)
            targets = r.seq.tokens[start + 1:min(start + len(logits), r.prompt_length - 1) + 1]
            counts.append(len(targets))
            if targets:  # the last row of the prompt predicts a new token, not a prompt token
                logp = logits[:len(targets)].float().log_softmax(-1)
                ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
                picked.append(logp.gather(1, ids.unsqueeze(1)).squeeze(1))
        values = torch.cat(picked).tolist() if picked else []
        for (r, _, _), offset, count in zip(wanted, itertools.accumulate([0] + counts), counts):
            r.prompt_logprobs += values[offset:offset + count]

    def next_choices(self, requests: List[Request]) -> List[Choice]:
        """Each request's next token: chosen by a step launched ahead, or by a forward pass over the rest now.
        When every request has a step in flight, the step after it is launched first, from the tokens those
        steps chose on the device, so the GPU never waits for the host (`engine.pipeline`)."""
        following = self.steps_ahead.follow(requests)
        fed_other_tokens = self.steps_ahead.collect()
        if following is not None:
            if fed_other_tokens:  # a read fell back to per-request sampling: other tokens than those chosen
                self.steps_ahead.discard(following)
            else:
                self.steps_ahead.add(following)
        now = [r for r in requests if r.ahead is None]
        if now:
            logits = self.runner.forward([r.seq for r in now], [1] * len(now), prefill=False)
            for r, choice in zip(now, self.runner.sample(now, logits)):
                r.ahead = choice
        choices = [r.ahead for r in requests]
        for r in requests:
            r.ahead = None
        return choices

    def finish_step(self, requests: List[Request], choices: List[Choice],
                    launch_ahead: bool = True) -> List[StepResult]:
        """Each request's result from its chosen token: the token joins the sequence, the next decode step is
        launched for the requests that go on (`engine.pipeline`; unless `launch_ahead` is False), then text,
        stop and result follow per request while the GPU computes; a request that fails there ends alone."""
        for r, choice in zip(requests, choices):
            if choice.error is None:
                r.seq.tokens.append(choice.token)
        if launch_ahead:
            self.steps_ahead.launch([r for r, choice in zip(requests, choices) if self.goes_on(r, choice)])
        results = []
        for i, (r, choice) in enumerate(zip(requests, choices)):
            if choice.error is not None:
                logger.error("request %d failed (%s); its batch goes on", r.id, choice.error)
                results.append(self.end_alone(r, choice.error))
                continue
            try:
                results.append(self.choose_one(r, choice))
            except Exception as error:  # its text or its stop: this request ends, alone
                logger.exception("request %d failed; its batch goes on", r.id)
                results.append(self.end_alone(r, f"{type(error).__name__}: {error}"))
        return results

    @staticmethod
    def goes_on(r: Request, choice: Choice) -> bool:
        """Whether the request surely feeds this token back (a stop sequence, known only from its text, may
        still end it: the step launched ahead then chose one token too many, within the request's blocks)."""
        return (choice.error is None and len(r.generated) < r.max_new_tokens
                and choice.token not in r.stopping.eos_token_ids and not (r.grammar is not None and r.grammar.finished))

    def end_alone(self, r: Request, message: str) -> StepResult:
        r.finish_reason = "error"
        return self.failed(r.id, message, r.generated, r.prompt_length if not r.generated else 0)

    def choose_one(self, r: Request, choice: Choice) -> StepResult:
        """The result of the token `finish_step` appended: its text, whether it ends the request, and (when
        it does) the whole text."""
        token = choice.token
        text = self.decode_increment(r, token)
        result = StepResult(r.id, TokenChoice(token, choice.logprob, text, token in self.special_ids,
                                              [(t, lp, self.token_text(t)) for t, lp in choice.alternatives]))
        if len(r.generated) == 1:  # the prefill step reports the prompt
            result.prompt_length = r.prompt_length
        if len(r.generated) == 1 and r.prefill_logprobs:
            result.prompt_tokens = self.prompt_choices(r)
        r.finish_reason = result.finish_reason = r.stopping(token, text, len(r.generated))
        if r.finish_reason is None and r.grammar is not None and r.grammar.finished:
            r.finish_reason = result.finish_reason = "eos"  # the JSON is complete: only EOS could follow
        if result.finish_reason:
            result.text = self.generated_text(r)
            result.generated_ids = list(r.generated)
            result.seed = r.chooser.seed if r.chooser.generator is not None else None
        return result

    def failed(self, request_id: int, message: str, generated: Sequence[int] = (), prompt_length: int = 0) -> StepResult:
        """The last result of a request that ends alone: an empty special token, then the reason."""
        eos = self.eos_token_ids[0] if self.eos_token_ids and self.eos_token_ids[0] is not None else 0
        return StepResult(request_id, TokenChoice(eos, math.nan, "", True), prompt_length=prompt_length,
                          finish_reason="error", error=f"request {request_id}: {message}", generated_ids=list(generated))

    def generated_text(self, r: Request) -> str:
        """The whole generated text, decoded once when the request ends (engine.text.final_text)."""
        return final_text(self.tokenizer, r.seq.tokens[r.prompt_length - 1], r.generated)

    def prompt_choices(self, r: Request) -> List[TokenChoice]:
        prompt = r.seq.tokens[:r.prompt_length]
        return [TokenChoice(t, lp, self.token_text(t), t in self.special_ids)
                for t, lp in zip(prompt, r.prompt_logprobs)]

    def token_text(self, token: int) -> str:
        """A token's text alone, decoded once per token id."""
        text = self.token_texts.get(token)
        if text is None:
            text = self.token_texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def decode_increment(self, r: Request, token: int) -> str:
        """Text the newest token adds; empty while it ends inside an unfinished multi-byte character."""
        if r.decoder is None:
            context = r.seq.tokens[max(r.prompt_length - CONTEXT_TOKENS, 0):r.prompt_length]
            r.decoder = incremental_decoder(self.tokenizer, context)
        return r.decoder.step(token)

    # -- batch bookkeeping ---------------------------------------------------------------------------

    def keep(self, batch: Batch) -> Optional[Batch]:
        """Drops finished requests (their blocks go back now); stores the batch if anything is left."""
        live = [r for r in batch.requests if r.finish_reason is None]
        self.release([r for r in batch.requests if r.finish_reason is not None])
        if not live:
            self.batches.pop(batch.id, None)
            self.forget_if_idle()
            return None
        batch.requests = live
        self.batches[batch.id] = batch
        return batch

    def concatenate(self, batch_ids: Sequence[int]) -> Batch:
        if not batch_ids or len(set(batch_ids)) != len(batch_ids):
            raise RequestError(f"batches to decode must be given once each, got {list(batch_ids)}")
        missing = [i for i in batch_ids if i not in self.batches]
        if missing:
            raise BatchNotFound(f"batch {missing[0]} is not in the cache")
        batches = [self.batches.pop(i) for i in batch_ids]
        merged = Batch(batches[0].id, [r for b in batches for r in b.requests], self.cache.block_size)
        self.batches[merged.id] = merged
        return merged

    def filter(self, batch_id: int, request_ids: Sequence[int]) -> Optional[Batch]:
        if batch_id not in self.batches:
            raise BatchNotFound(f"batch {batch_id} is not in the cache")
        batch = self.batches[batch_id]
        unknown = set(request_ids) - {r.id for r in batch.requests}
        if unknown:
            raise RequestError(f"requests {sorted(unknown)} are not in batch {batch_id}")
        keep = set(request_ids)
        self.release([r for r in batch.requests if r.id not in keep])
        batch.requests = [r for r in batch.requests if r.id in keep]
        if not batch.requests:
            del self.batches[batch_id]
            self.forget_if_idle()
            return None
        return batch

    def clear(self, batch_id: Optional[int] = None) -> None:
        ids = list(self.batches) if batch_id is None else [batch_id]
        for i in ids:
            if i in self.batches:
                self.release(self.batches.pop(i).requests)
        self.forget_if_idle()

    def forget_if_idle(self) -> None:
        """With no batch left, nothing launched ahead can be read (a request that ended by a stop sequence or
        EOS may have had a step in flight) and no block table is needed again: drop them, so an idle server
        holds the same tensors every time. The GPU finishes what was launched; stream order keeps it safe."""
        if not self.batches:
            self.steps_ahead.drop()
            self.runner.forget_tables()

    @torch.no_grad()
    def warm_up_kernels(self, max_prefill_tokens: Optional[int] = None) -> None:
        """Compiles the prefill kernels serving can meet (`ModelRunner.warm_up_prefill`) up to the prompt tokens
        one prefill may take (and what the cache holds), once per engine: with no batch alive and before any
        prefix is cached, since it writes free blocks. It only saves time later, so a failure is logged, not
        raised."""
        if self.kernels_warm:
            return
        if self.batches:
            raise RequestError("kernels are warmed up with no batch alive")
        room = min(len(self.cache.free_blocks) * self.cache.block_size, self.config.max_position_embeddings)
        most = min(room, max_prefill_tokens or room)
        prefixes = [p for p in (512, 1024) if p + 128 <= room] or [p for p in [room - 128] if p >= 16]
        try:
            if prefixes:
                self.runner.warm_up_prefill(prefixes, [n for n in PLAIN_WARM_UP if n <= most])
            if self.runner.step_graphs is not None:  # every bucket: a step may exceed max_prefill_tokens
                self.runner.step_graphs.prepare()  # by one token per running request
        except Exception:
            logger.exception("the kernel warm-up failed; kernels compile at their first use instead")
        self.kernels_warm = True

    def merge_adapter(self, index: int) -> None:
        """Folds adapter `index` into the base weights (every base request then gets it) and frees the index."""
        if self.batches:
            raise RequestError("merging changes the base model under live requests: clear the cache first")
        merge_into(self.model, self.adapters.offload(index))

    def live_request_ids(self) -> set:
        return {r.id for batch in self.batches.values() for r in batch.requests}

    def adapters_in_use(self) -> Dict[int, List[int]]:
        used: Dict[int, List[int]] = {}
        for batch in self.batches.values():
            for r in batch.requests:
                used.setdefault(r.seq.adapter_index, []).append(r.id)
        return used

    # -- one-shot generation (the `generate` command and the tests) -----------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 adapter_indices: Optional[Sequence[int]] = None) -> List[StepResult]:
        """Generates for every prompt in one batch; `adapter_indices[i]` picks prompt i's adapter (0 = base)."""
        adapter_indices = list(adapter_indices or [0] * len(prompts))
        requests = [self.new_request(i, self.tokenize(p, [], 0), params, max_new_tokens, adapter_index=a)
                    for i, (p, a) in enumerate(zip(prompts, adapter_indices))]
        finished = {}
        results, batch = self.prefill(next(self.batch_ids), requests)
        while True:
            finished.update({r.request_id: r for r in results if r.finish_reason})
            if batch is None:
                return [finished[i] for i in range(len(prompts))]
            results, batch = self.decode([batch.id])


def decode_ahead_default(device: torch.device) -> bool:
    """Whether decode steps are launched ahead: on a GPU, where the host returns while the device computes; not
    on a CPU, where a step launched ahead is computed before the call answers, so every token would wait for
    the next one. LORAX_DECODE_AHEAD=1 or 0 decides instead (the CPU tests run the pipelined path with it)."""
    setting = os.getenv("LORAX_DECODE_AHEAD")
    if setting is None or setting.strip() == "":
        return device.type == "cuda"
    return env_flag("LORAX_DECODE_AHEAD")


def env_flag(name: str) -> bool:
    """An upstream boolean environment variable ("1" / "0", as the launcher writes them; "true" also taken)."""
    value = os.getenv(name, "0").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected 1 or 0")


def kv_cache_blocks(model, block_size: int, budget_bytes: int, dtype: torch.dtype) -> int:
    """How many blocks of this model's KV cache fit in `budget_bytes` (at least one)."""
    per_token = 2 * model.config.num_hidden_layers * model.num_kv_heads * model.head_dim
    per_block = per_token * block_size * torch.empty((), dtype=dtype).element_size()
    return max(1, budget_bytes // per_block)

