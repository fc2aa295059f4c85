"""One decode step of full-size Mixtral-8x7B (random bf16 weights) through the engine, against the model alone.

The engine's step (FlashCausalLM.decode: packing, adapter data, CUDA-graph replay, sampling, detokenizing,
stopping) is timed wall-clock around the call, which returns Python results (so it ends synchronised);
the model alone is the same step's graph replay without the engine around it (bench.layer_stack's way).
Prompts of 2048 random tokens are prefilled through the engine in chunks, then every step decodes all rows.
The tokenizer is a synthetic Rust-backed one over the same vocabulary, so detokenizing costs what a real
tokenizer's incremental decode costs.

    python -m bench.engine_step [--layers 32] [--batches 1 64]
"""

import argparse
import time

import torch

from bench.common import card, copy_bandwidth, print_table, time_graph_ms
from bench.layer_stack import MIXTRAL_8X7B, RandomWeights, decode_floor_ms
from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig
from lorax_server.models.flash_causal_lm import FlashCausalLM
from lorax_server.engine.cache import PagedSequence
from lorax_server.engine.runner import PendingChoices, pack
from lorax_server.utils.tokens import SamplingParams

CONTEXT = 2048
NEW_TOKENS = 64
PREFILL_CHUNK = 8  # requests per prefill (16k tokens): the activations of one prefill stay small
MODES = {"greedy": SamplingParams(),
         "sampled": SamplingParams(temperature=0.7, top_k=50, top_p=0.9, do_sample=True, seed=1)}


def synthetic_tokenizer(vocab_size: int):
    """A fast (Rust-backed) tokenizer over Mixtral's vocabulary size, one word per id: text costs what a
    real tokenizer's incremental decode (tokenizers' DecodeStream) costs. Ids 1 and 2 are BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="w1", eos_token="w2")


def build_engine(layers: int, max_batch: int, context: int = CONTEXT, kv_fp8: bool = False) -> FlashCausalLM:
    """`kv_fp8`: the KV cache in float8_e4m3fn (scales 1.0: random weights have none), as --kv-cache-dtype fp8."""
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=layers,
                           max_position_embeddings=context + NEW_TOKENS + 64)
    model = FlashMixtralForCausalLM("", config, RandomWeights()).eval()
    blocks = max_batch * (context + NEW_TOKENS) // 16 + max_batch + 16
    return FlashCausalLM(model, synthetic_tokenizer(config.vocab_size), torch.bfloat16, "cuda", blocks,
                         kv_cache_dtype=torch.float8_e4m3fn if kv_fp8 else None)


def live_batch(engine: FlashCausalLM, batch: int, params: SamplingParams, first_id: int, context: int = CONTEXT) -> int:
    """Prefills `batch` requests of `context` random tokens in chunks and merges them; returns the batch id."""
    generator = torch.Generator().manual_seed(first_id)
    ids = []
    for start in range(0, batch, PREFILL_CHUNK):
        requests = [engine.new_request(first_id + i, torch.randint(3, 32000, (context,), generator=generator).tolist(),
                                       params, NEW_TOKENS, ignore_eos=True)
                    for i in range(start, min(batch, start + PREFILL_CHUNK))]
        _, kept = engine.prefill(first_id + start, requests)
        ids.append(kept.id)
    return engine.concatenate(ids).id


def engine_step_ms(engine: FlashCausalLM, batch_id: int, steps: int) -> float:
    """Wall time per decode call over `steps` calls back to back, as the router makes them (two warm-up calls
    first). Not per call with a sync before each: a step launched ahead runs between calls, and a sync there
    would hide it."""
    for _ in range(2):
        batch_id = engine.decode([batch_id])[1].id
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch_id = engine.decode([batch_id])[1].id
    engine.steps_ahead.collect()  # the last call's step launched ahead belongs to the next call: wait for it
    return (time.perf_counter() - start) * 1e3 / steps


def per_request_sampling(engine: FlashCausalLM):
    """The engine as it sampled before the batched sampler: each request with its own chooser (the oracle)."""
    # Every choice goes through `start` (steps launched ahead and in turn); without a batched launch it is the
    # per-request fallback.
    engine.runner.start = lambda requests, logits: PendingChoices(requests, logits, None)


def model_step_ms(engine: FlashCausalLM, batch_id: int) -> float:
    """The same step's forward alone, replayed from a CUDA graph: each sequence's last token again (its K/V
    slot is rewritten with the same values; copies of the sequences, so nothing is advanced)."""
    seqs = [PagedSequence(r.seq.tokens, r.seq.adapter_index, len(r.seq.tokens) - 1, r.seq.blocks)
            for r in engine.batches[batch_id].requests]
    inputs = pack(seqs, [1] * len(seqs), engine.cache, False, engine.device).model_inputs(engine.cache.layers)
    return time_graph_ms(lambda: engine.model(**inputs), repeat=20)


def kernel_profile(engine: FlashCausalLM, batch_id: int, steps: int = 3) -> None:
    """Where the GPU time of the model's step goes: its kernels over `steps` eager forwards (each kernel takes
    what it takes in the graph; only the launch gaps differ), per step."""
    seqs = [PagedSequence(r.seq.tokens, r.seq.adapter_index, len(r.seq.tokens) - 1, r.seq.blocks)
            for r in engine.batches[batch_id].requests]
    inputs = pack(seqs, [1] * len(seqs), engine.cache, False, engine.device).model_inputs(engine.cache.layers)
    engine.model(**inputs)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.model(**inputs)
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3 / steps
    print(f"\nkernels of the model's step at b={len(seqs)} ({steps} eager steps): GPU busy {busy:.2f} ms a step")
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


def profile_steps(engine: FlashCausalLM, batch_id: int, steps: int) -> None:
    """Where the host time of a step goes: cProfile over `steps` decode steps, the functions that take most."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        _, kept = engine.decode([batch_id])
        batch_id = kept.id
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--context", type=int, default=CONTEXT, help="prompt tokens of every row (2048)")
    parser.add_argument("--per-request", type=int, nargs="*", default=[64],
                        help="batches also timed with per-request sampling (the engine before the batched sampler)")
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="batches whose steps are also profiled on the host (cProfile)")
    parser.add_argument("--kernels", type=int, nargs="*", default=[],
                        help="batches whose model step is also profiled on the GPU (its kernels, torch.profiler)")
    parser.add_argument("--kv-fp8", action="store_true", help="the KV cache in FP8 (e4m3), as --kv-cache-dtype fp8")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    engine = build_engine(args.layers, max(args.batches), args.context, args.kv_fp8)
    engine.graphs.prepare(args.context + NEW_TOKENS) if engine.graphs is not None else None
    rows, first_id = [], 0
    with torch.no_grad():
        for batch in args.batches:
            floor = decode_floor_ms(engine.config, args.layers, batch, bandwidth, context=args.context,
                                    kv_bytes=1 if args.kv_fp8 else 2)
            for mode, params in MODES.items():
                batch_id = live_batch(engine, batch, params, first_id, args.context)
                first_id += 10_000
                alone = model_step_ms(engine, batch_id)
                step = engine_step_ms(engine, batch_id, args.steps)
                rows.append([f"b={batch} {mode}", f"{floor:.2f}", f"{alone:.2f}", f"{step:.2f}",
                             f"{step / alone:.2f}x", f"{step / floor:.2f}x"])
                engine.decode_ahead = False  # each step launched when its Decode call comes
                step = engine_step_ms(engine, batch_id, args.steps)
                engine.decode_ahead = True
                rows.append([f"b={batch} {mode}, no step ahead", f"{floor:.2f}", f"{alone:.2f}", f"{step:.2f}",
                             f"{step / alone:.2f}x", f"{step / floor:.2f}x"])
                if batch in args.per_request:
                    per_request_sampling(engine)
                    step = engine_step_ms(engine, batch_id, args.steps)
                    del engine.runner.start  # the class's batched sampling again
                    rows.append([f"b={batch} {mode}, per-request sampling", f"{floor:.2f}", f"{alone:.2f}",
                                 f"{step:.2f}", f"{step / alone:.2f}x", f"{step / floor:.2f}x"])
                if batch in args.profile:
                    profile_steps(engine, batch_id, args.steps)
                if batch in args.kernels and mode == next(iter(MODES)):
                    kernel_profile(engine, batch_id)
                engine.clear()
    print_table(f"Decode step through the engine, {args.layers} Mixtral-8x7B layers, bf16"
                f"{' with an FP8 KV cache' if args.kv_fp8 else ''}, context {args.context}, "
                f"{card()} (copy {bandwidth / 1e12:.2f} TB/s)",
                ["step", "floor ms", "model alone (graph) ms", "engine step ms", "engine / model", "engine / floor"],
                rows)


if __name__ == "__main__":
    main()
