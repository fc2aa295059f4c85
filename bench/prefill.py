"""Prefill through the engine: plain prompts against the matmul floor, a shared prefix served from the cache
(prefix caching), and running decodes while a long prompt is prefilled in chunks (chunked prefill).

Full-size random Mixtral-8x7B (bf16, or `--fp8`) on one GPU through `FlashCausalLM`, the way LoRAX's router
drives it (the router's blocks, `cache_len`, `chunk_len` and `cached_batch`); `--smoke` runs the same on the
CPU with the embedded tiny model (tests/bench keeps it from rotting). Every request is greedy.

1. Plain prefill (issue 11): one Prefill of 1 x 4096, 16 x 512 and 64 x 128 prompt tokens, wall time around
   the call (it returns the first tokens, so it ends synchronised), against its FLOP floor at the matmul rate
   measured in the same run (bench.serve.Floor: the layers' matmuls, causal attention, and lm_head's rows).
2. Prefix caching (issue 15; target >= 10x): 64 requests of one shared 2000-token prefix and 128 tokens of
   their own. Without the cache their prompts are prefilled whole, in Prefills of at most
   max_batch_prefill_tokens; with it, one request first prefills the prefix (not timed), and the 64 arrive
   with the router's blocks (the prefix's whole blocks shared) and `cache_len` = the prefix, so one Prefill
   runs their 64 x 128 own tokens over the cached prefix, twice (the first hit after the warm-up, and the
   next). Reported: the times and their ratios.
3. Chunked prefill (issue 15; target: TPOT p99 <= 2x): 32 requests decode at context 512; their time per
   output token (wall time of a Decode call, calls back to back) is taken over 32 steps alone, then while a
   16k-token prompt joins in chunks of 128 to 2048 tokens (the router's max_batch_prefill_tokens sizes
   them; Prefill with `cached_batch`, then Decode calls until its first token), and, for comparison, while the same prompt is prefilled in one piece (the stall the
   running requests see).

    python -m bench.prefill [--layers 32] [--fp8]
    python -m bench.prefill --smoke
    python -m bench.prefill --profile-chunk 256
"""

import argparse
import cProfile
import contextlib
import gc
import itertools
import os
import pstats
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from bench.common import print_table
from bench.serve import BLOCK_SIZE, FIRST_TOKEN, GREEDY, Floor, cpu_ceilings, device_ceilings, percentile
from lorax_server.models.flash_causal_lm import FlashCausalLM

FULL = dict(plain=[(1, 4096), (16, 512), (64, 128)], prefix=2000, own=128, sharing=64, running=32, context=512,
            long=16384, chunks=(128, 256, 512, 1024, 2048), prefill_budget=16384)
SMOKE = dict(plain=[(1, 64), (4, 16)], prefix=32, own=8, sharing=4, running=3, context=16, long=96, chunks=(24,),
             prefill_budget=64)


@contextlib.contextmanager
def split_kv_off(engine):
    """The prefill attention without split-KV (its escape hatch, read at every launch)."""
    before = os.environ.get("LORAX_PREFILL_SPLIT_KV")
    os.environ["LORAX_PREFILL_SPLIT_KV"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["LORAX_PREFILL_SPLIT_KV"]
        else:
            os.environ["LORAX_PREFILL_SPLIT_KV"] = before


@contextlib.contextmanager
def no_steps_ahead(engine):
    """No decode step launched ahead: each call launches its step and waits for it."""
    before, engine.steps_ahead.enabled = engine.steps_ahead.enabled, False
    try:
        yield
    finally:
        engine.steps_ahead.enabled = before


@contextlib.contextmanager
def no_step_graphs(engine):
    """Prefill and mixed steps launched eagerly, kernel by kernel (LORAX_STEP_GRAPHS=0), not replayed from the
    CUDA graphs between their attentions (engine.step_graphs, on by default with CUDA)."""
    before, engine.runner.step_graphs = engine.runner.step_graphs, None
    try:
        yield
    finally:
        engine.runner.step_graphs = before


VARIANTS = {"default": contextlib.nullcontext, "no-split-kv": split_kv_off, "no-steps-ahead": no_steps_ahead,
            "no-step-graphs": no_step_graphs}


class Blocks:
    """Hands out block ids as LoRAX's router does: distinct free blocks for every request of a Prefill; block 0
    is the router's probe's. A request's blocks come back to the engine's free list when it ends."""

    def __init__(self, engine: FlashCausalLM):
        self.engine = engine
        self.taken: set = set()

    def fresh(self, tokens: int, reuse: Sequence[int] = ()) -> List[int]:
        needed = self.engine.cache.blocks_for(tokens) - len(reuse)
        skip = self.taken.union(reuse)
        free = list(itertools.islice((b for b in self.engine.cache.free_blocks if b not in skip), needed))
        if needed > len(free):
            raise RuntimeError(f"the cache has {len(free)} free blocks of the {needed} needed")
        self.taken.update(free[:needed])
        return list(reuse) + free[:needed]

    def settle(self) -> None:
        """After a Prefill: the engine owns what it claimed."""
        self.taken.clear()


def prompt(seed: int, n: int, vocab: int) -> List[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, vocab, (n,), generator=generator).tolist()


def timed(engine: FlashCausalLM, fn):
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def prefill(engine: FlashCausalLM, blocks: Blocks, batch_id: int, prompts: Dict[int, List[int]], new: int,
            cache_len: int = 0, reuse: Sequence[int] = (), chunk_len=None, cached_batch_id=None):
    requests = [engine.new_request(i, ids, GREEDY, new, ignore_eos=True, cache_len=cache_len, chunk_len=chunk_len)
                for i, ids in prompts.items()]
    router = {i: blocks.fresh(len(ids) + new - 1, reuse) for i, ids in prompts.items()}
    results, batch = engine.prefill(batch_id, requests, router, cached_batch_id=cached_batch_id)
    blocks.settle()
    failed = [r.error for r in results if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(failed[0])
    return batch


def plain_rows(engine, blocks, shapes, floor: Floor) -> List[List[str]]:
    rows, vocab = [], engine.config.vocab_size
    for count, length in shapes:
        prompts = {i: prompt(i, length, vocab) for i in range(count)}
        prefill(engine, blocks, 1, {0: prompts[0][:16]}, 1)  # warm-up of this token count's kernels, untimed
        prefill(engine, blocks, 2, prompts, 1)
        _, seconds = timed(engine, lambda: prefill(engine, blocks, 3, prompts, 1))
        flops = floor.flops(count * length, count * length * (length + 1) // 2, count)
        floor_s = flops / floor.ceilings.matmul
        rows.append([f"{count} x {length}", f"{seconds * 1e3:.1f}", f"{floor_s * 1e3:.1f}", f"{floor_s / seconds:.0%}"])
        engine.clear()
    return rows


def prefix_rows(engine, blocks, cfg) -> List[List[str]]:
    vocab, prefix_len, own, sharing = engine.config.vocab_size, cfg["prefix"], cfg["own"], cfg["sharing"]
    shared = prompt(7, prefix_len, vocab)
    prompts = {i: shared + prompt(100 + i, own, vocab) for i in range(sharing)}
    per_call = max(1, cfg["prefill_budget"] // (prefix_len + own))

    def uncached():
        ids = list(prompts)
        for start in range(0, len(ids), per_call):
            prefill(engine, blocks, 10 + start, {i: prompts[i] for i in ids[start:start + per_call]}, 1)

    uncached()  # warm-up
    engine.clear()
    _, without = timed(engine, uncached)
    engine.clear()
    cached_len = prefix_len // BLOCK_SIZE * BLOCK_SIZE  # the router's trie gives whole blocks
    first = prefill(engine, blocks, 20, {1000: shared + prompt(99, own, vocab)}, 2)  # alive: its blocks are read
    prefix_blocks = list(first.requests[0].seq.blocks[:cached_len // BLOCK_SIZE])
    engine.clear()  # the prefix's blocks go back to the free list, still holding its K/V (the router's trie)

    def cached():
        prefill(engine, blocks, 21, prompts, 1, cache_len=cached_len, reuse=prefix_blocks)

    _, first_hit = timed(engine, cached)  # the first hit after Warmup: any kernel compile shows here
    engine.clear()
    _, again = timed(engine, cached)
    engine.clear()
    return [[f"{sharing} x ({prefix_len} shared + {own})", f"{without * 1e3:.1f}", f"{first_hit * 1e3:.1f}",
             f"{again * 1e3:.1f}", f"{without / first_hit:.1f}x", f"{without / again:.1f}x"]]


def decode_times(engine, batch_id: int, steps: int, launches: Optional[List[float]] = None,
                 events: Optional[List[str]] = None) -> List[float]:
    """Wall time of each of `steps` Decode calls, back to back; with `launches`, also the host time each spent
    launching forward passes (`HostLaunchTimer`); with `events`, what else happened in each (`CallEvents`)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with HostLaunchTimer(engine) as timer, CallEvents(events):
            _, batch = engine.decode([batch_id])
        times.append(time.perf_counter() - start)
        if launches is not None:
            launches.append(timer.seconds)
        if events is not None:
            events[-1] += f", tokens {timer.tokens}"
        batch_id = batch.id
    return times


class CallEvents:
    """Appends to `events` (when given) what happened during the block beside its own work: Python garbage
    collections, Triton kernels compiled or loaded from the disk cache (each a stall of milliseconds to seconds)
    and, on a GPU, device allocations (cudaMalloc) and allocation retries (the caching allocator freeing its
    cache, which waits for the GPU). For the slowest calls of the chunked table."""

    def __init__(self, events: Optional[List[str]]):
        self.events, self.collections, self.compiled = events, 0, []

    def count(self, phase, info):
        if phase == "start":
            self.collections += 1

    def compile_hook(self, *, repr, **kwargs):
        self.compiled.append(repr.split("[")[0].split("(")[0])

    @staticmethod
    def set_compile_hook(hook) -> None:
        if torch.cuda.is_available():  # Triton is installed with CUDA (and only needed there)
            import triton
            triton.knobs.runtime.jit_post_compile_hook = hook

    def allocator(self):
        if not torch.cuda.is_available():
            return 0, 0
        stats = torch.cuda.memory_stats()
        return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)

    def __enter__(self):
        if self.events is not None:
            gc.callbacks.append(self.count)
            self.before = self.allocator()
            self.set_compile_hook(self.compile_hook)
        return self

    def __exit__(self, *exc):
        if self.events is not None:
            gc.callbacks.remove(self.count)
            self.set_compile_hook(None)
            (mallocs, retries), (mallocs0, retries0) = self.allocator(), self.before
            compiled = f", compiled {'/'.join(self.compiled)}" if self.compiled else ""
            self.events.append(f"gc {self.collections}, cudaMalloc {mallocs - mallocs0}, retries {retries - retries0}"
                               + compiled)


class HostLaunchTimer:
    """Host seconds spent in the runner's forward calls (packing the inputs and launching every kernel, no
    wait for the GPU) while in the block: when it nears a step's wall time, the step is host-bound."""

    def __init__(self, engine):
        self.runner, self.seconds, self.tokens = engine.runner, 0.0, 0  # tokens: the forwards' new tokens

    def __enter__(self):
        forward = self.runner.forward

        def timed(seqs, new_counts, *args, **kwargs):
            self.tokens += sum(new_counts)
            start = time.perf_counter()
            try:
                return forward(seqs, new_counts, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        self.runner.forward = timed
        return self

    def __exit__(self, *exc):
        del self.runner.forward  # the class's method again


def running_new_tokens(cfg, steps: int = 32) -> int:
    """Tokens each running request of the chunked table may generate: enough to decode through the warm-up,
    `steps` calls alone and every chunk step of the long prompt at the smallest chunk size (each step's chunk
    is the budget less one token per running request). Fewer, and the running requests ended before the
    prompt did: the last chunk steps then had no decode in them, and nothing made those calls wait for their
    GPU work but the last one (measured: a 268 ms "TPOT" that was 30 chunk steps)."""
    per_step = max(1, min(cfg["chunks"]) - cfg["running"])
    return 4 + steps + 8 + -(-cfg["long"] // per_step) + 8


def running_batch(engine, blocks, cfg):
    """The chunked table's running requests, prefilled on a cleared engine: its batch."""
    vocab = engine.config.vocab_size
    running = {i: prompt(200 + i, cfg["context"], vocab) for i in range(cfg["running"])}
    engine.clear()
    return prefill(engine, blocks, 30, running, running_new_tokens(cfg))


PROFILED = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]


def gpu_busy_ms(events) -> float:
    return sum(e.self_device_time_total for e in events) / 1e3


def chunked_rows(engine, blocks, cfg) -> List[List[str]]:
    vocab, steps = engine.config.vocab_size, 32
    long = prompt(300, cfg["long"], vocab)
    rows = []
    for mode in ("alone", *[f"chunks of {c}" for c in cfg["chunks"]], "one piece"):
        launches, events = [], []  # events: of the Decode calls after the chunked Prefill (times[1:])
        batch = running_batch(engine, blocks, cfg)
        decode_times(engine, batch.id, 4)  # warm-up
        if mode == "alone":
            times = decode_times(engine, batch.id, steps, launches)
        elif mode.startswith("chunks"):
            chunk = int(mode.split()[-1])
            engine.max_prefill_tokens = chunk
            start = time.perf_counter()
            prefill(engine, blocks, 31, {999: long}, 2, chunk_len=chunk, cached_batch_id=batch.id)
            times = [time.perf_counter() - start]
            while any(r.prefilling for r in engine.batches[batch.id].requests):
                times += decode_times(engine, batch.id, 1, launches, events)
            engine.max_prefill_tokens = None
        else:
            start = time.perf_counter()
            new = prefill(engine, blocks, 32, {999: long}, 2)
            times = [time.perf_counter() - start]
            times += decode_times(engine, engine.concatenate([batch.id, new.id]).id, 1)
        slowest = sorted(range(len(times)), key=times.__getitem__)[-4:][::-1]
        print(f"{mode}: slowest calls (index of {len(times)}: ms) "
              + ", ".join(f"{i}: {times[i] * 1e3:.1f}" + (f" ({events[i - 1]})" if 0 < i <= len(events) else "")
                          for i in slowest), flush=True)
        launch = f"{statistics.median(launches) * 1e3:.1f}" if launches else "-"
        rows.append([mode, str(len(times)), f"{statistics.median(times) * 1e3:.1f}", f"{percentile(times, 99) * 1e3:.1f}",
                     f"{max(times) * 1e3:.1f}", launch])
    engine.clear()
    alone_p99 = float(rows[0][3])
    for row in rows:
        row.append(f"{float(row[3]) / alone_p99:.2f}x")
    return rows


def profile_chunk(engine, blocks, cfg, chunk: int, host_profile: bool = False) -> None:
    """The kernels of one step that runs a chunk (half-way through the long prompt) beside the running decodes,
    and how much of the step's wall time the GPU was busy (the rest is the host launching); with
    `host_profile`, also where the host's time goes over the next few such steps (cProfile)."""
    vocab = engine.config.vocab_size
    batch = running_batch(engine, blocks, cfg)
    engine.max_prefill_tokens = chunk
    prefill(engine, blocks, 31, {999: prompt(300, cfg["long"], vocab)}, 2, chunk_len=chunk, cached_batch_id=batch.id)
    decode_times(engine, batch.id, cfg["long"] // chunk // 2)
    with torch.profiler.profile(activities=PROFILED) as prof:
        (wall,) = decode_times(engine, batch.id, 1)
    if host_profile:
        profiler = cProfile.Profile()
        profiler.enable()
        decode_times(engine, batch.id, 4)
        profiler.disable()
    engine.max_prefill_tokens = None
    engine.clear()
    events = prof.key_averages()
    busy = gpu_busy_ms(events)
    print(f"\none step with a {chunk}-token chunk at prefix {cfg['long'] // 2} beside {cfg['running']} decodes: "
          f"wall {wall * 1e3:.1f} ms (profiled), GPU busy {busy:.1f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    if host_profile:
        print("\nHost profile of the next 4 such steps (cProfile; its own overhead inflates the times)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)


def profile_calls(engine, blocks, cfg, chunk: int, indices: Sequence[int]) -> None:
    """The chunked table's calls at `indices` (0: the Prefill that brings the long prompt; then its Decode calls)
    under torch.profiler, each printed with its wall time, GPU busy time, host-side ops (the CUDA runtime calls
    among them: a synchronisation or a blocking copy shows there) and kernels: for calls slower than their
    neighbours at the same index run after run."""
    vocab = engine.config.vocab_size
    batch = running_batch(engine, blocks, cfg)
    decode_times(engine, batch.id, 4)
    engine.max_prefill_tokens = chunk
    call = 0
    while call == 0 or any(r.prefilling for r in engine.batches[batch.id].requests):
        profiled = call in indices
        with torch.profiler.profile(activities=PROFILED) if profiled else contextlib.nullcontext() as prof:
            start = time.perf_counter()
            if call == 0:
                prefill(engine, blocks, 31, {999: prompt(300, cfg["long"], vocab)}, 2, chunk_len=chunk,
                        cached_batch_id=batch.id)
            else:
                decode_times(engine, batch.id, 1)
            wall = time.perf_counter() - start
        if profiled:
            events = prof.key_averages()
            busy = gpu_busy_ms(events)
            print(f"\ncall {call} (chunks of {chunk}): wall {wall * 1e3:.1f} ms (profiled), GPU busy {busy:.1f} ms")
            print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
            print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
        call += 1
    engine.max_prefill_tokens = None
    engine.clear()


def build(args):
    if args.smoke:
        from lorax_server.cli import DEFAULT_MODEL_DIR
        from lorax_server.models import get_model

        torch.set_num_threads(1)  # a tiny model: more threads only contend
        engine = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=4 << 20,
                           quantize="fp8" if args.fp8 else None)
        engine.warm_up_kernels()
        return engine, cpu_ceilings(), "tiny embedded Mixtral, fp32, CPU"
    from bench.engine_step import synthetic_tokenizer
    from bench.layer_stack import MIXTRAL_8X7B, RandomWeights
    from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig

    cfg = FULL
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers, max_position_embeddings=32768)
    ceilings = device_ceilings(args.fp8)
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights(fp8=args.fp8)).eval()
    free, _ = torch.cuda.mem_get_info()
    block_bytes = 2 * config.num_hidden_layers * model.num_kv_heads * model.head_dim * BLOCK_SIZE * 2
    tokens = (cfg["sharing"] * (cfg["prefix"] + cfg["own"]) + cfg["long"]
              + cfg["running"] * (cfg["context"] + running_new_tokens(cfg)))
    blocks = min((free - (12 << 30)) // block_bytes, 2 * tokens // BLOCK_SIZE)
    engine = FlashCausalLM(model, synthetic_tokenizer(config.vocab_size), torch.bfloat16, "cuda", int(blocks),
                           BLOCK_SIZE)
    engine.warm_up_kernels()  # as the server's Warmup: prefill kernels of short prompts and cached prefixes
    if engine.graphs is not None:  # the decode graphs of the longest context, captured before anything is timed
        engine.graphs.prepare(cfg["long"] + 8)
    return engine, ceilings, f"{args.layers} Mixtral-8x7B layers, {'FP8' if args.fp8 else 'bf16'}, {torch.cuda.get_device_name()}"


def main(argv=None) -> Dict[str, List[List[str]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="the embedded tiny model on the CPU")
    parser.add_argument("--only", nargs="*", choices=["plain", "prefix", "chunked"],
                        default=["plain", "prefix", "chunked"], help="the tables to run (default: all three)")
    parser.add_argument("--chunks", type=int, nargs="*", help="chunk sizes of the chunked table (default: 128-2048)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=["default"],
                        help="run the chunked table under each (A/B of the engine's switches, one model build)")
    parser.add_argument("--profile-chunk", type=int, metavar="TOKENS",
                        help="only profile one step of chunked prefill with chunks of this size")
    parser.add_argument("--host-profile", action="store_true", help="with --profile-chunk: also cProfile the host")
    parser.add_argument("--profile-calls", type=int, nargs="*", metavar="INDEX",
                        help="only profile these calls of the chunked table (its first chunk size) one by one")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.chunks:
        cfg["chunks"] = tuple(args.chunks)
    engine, ceilings, what = build(args)
    dtype_bytes = torch.empty((), dtype=engine.dtype).element_size()
    floor = Floor(engine.config, 1, dtype_bytes, ceilings, weight_bytes=1 if args.fp8 else None)
    blocks = Blocks(engine)
    if args.profile_calls:
        with torch.no_grad():
            return profile_calls(engine, blocks, cfg, cfg["chunks"][0], args.profile_calls)
    if args.profile_chunk:
        with torch.no_grad():
            return profile_chunk(engine, blocks, cfg, args.profile_chunk, args.host_profile)
    tables = {}
    with torch.no_grad():
        if "plain" in args.only:
            tables["plain"] = plain_rows(engine, blocks, cfg["plain"], floor)
        if "prefix" in args.only:
            tables["prefix"] = prefix_rows(engine, blocks, cfg)
        if "chunked" in args.only:
            for variant in args.variants:
                with VARIANTS[variant](engine):
                    tables["chunked" if variant == "default" else f"chunked, {variant}"] = chunked_rows(engine, blocks, cfg)
    if "plain" in tables:
        print_table(f"Plain prefill, {what} (matmul {ceilings.matmul / 1e12:.3g} TFLOP/s)",
                    ["prompts", "ms", "FLOP floor ms", "floor / wall"], tables["plain"])
    if "prefix" in tables:
        print_table(f"Prefix caching, {what}", ["requests", "without cache ms", "first hit ms", "next hit ms",
                                                "speedup (first)", "speedup (next)"], tables["prefix"])
    for name in [name for name in tables if name.startswith("chunked")]:
        print_table(f"Running decodes while a {cfg['long']}-token prompt is prefilled, {what} ({cfg['running']} "
                    f"running requests at context {cfg['context']}){name[len('chunked'):]}",
                    ["long prompt", "decode calls", "TPOT p50 ms", "TPOT p99 ms", "max ms", "host launch p50 ms",
                     "p99 / alone's p99"],
                    tables[name])
    return tables


if __name__ == "__main__":
    main()
