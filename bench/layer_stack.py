"""A stack of full-size Mixtral-8x7B layers with random weights: decode steps and a 4096-token prefill.

Decode at batch 1, 8, 32, 128 with 2048-token contexts (the cache holds random keys and values); the
floor is the bytes a step must read (attention weights, the experts the batch touches in expectation
under uniform routing, lm_head, the KV cache) over the measured copy bandwidth. Anchor: transformers'
MixtralForCausalLM (sdpa attention, grouped_mm experts) with the same layers and a 2048-token cache.

With --fp8 the same stack is built twice, bf16 and `--quantize fp8` (attention projections and experts in FP8,
quantized at load), and the steps are compared; the FP8 floor reads those weights at one byte each.

    python -m bench.layer_stack [--layers 8] [--fp8]
"""

import argparse

import torch

from bench.common import card, copy_bandwidth, matmul_rate, print_table, time_graph_ms, time_ms
from lorax_server.utils.backends import CHOSEN
from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig
from lorax_server.engine.cache import PagedKVCache, PagedSequence
from lorax_server.engine.runner import pack
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import MetaWeights

CONTEXT = 2048
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6)


class RandomWeights(MetaWeights):
    """Random tensors of the shapes the model asks for, on the GPU."""

    def __init__(self, group=None, fp8: bool = False):
        super().__init__(group or FakeGroup(0, 1), torch.bfloat16)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.fp8_compute = fp8

    def get_slice(self, name):
        shape = self.expected[name]
        return torch.randn(shape, device=self.device, dtype=torch.bfloat16) / (shape[-1] ** 0.5 if len(shape) > 1 else 1.0)

    def get_tensor(self, name, shape=None):
        self._check_shape(name, shape)
        return self.get_slice(name) if len(shape) > 1 else torch.ones(shape, device=self.device, dtype=torch.bfloat16)


def decode_floor_ms(config, layers, batch, bandwidth, weight_bytes=2, context=CONTEXT, kv_bytes=2):
    """`weight_bytes` per weight of the attention projections and experts (1 in FP8), `kv_bytes` per KV-cache
    entry (1 with an FP8 cache); every row at `context`."""
    h, f, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    attention = (h * config.num_attention_heads * 128 * 2 + h * config.num_key_value_heads * 128 * 2) * weight_bytes
    touched = e * (1 - (1 - k / e) ** batch)
    experts = touched * 3 * h * f * weight_bytes
    kv = batch * context * config.num_key_value_heads * 128 * 2 * kv_bytes
    total = layers * (attention + experts + kv) + config.vocab_size * h * 2
    return total / bandwidth * 1e3


def decode_inputs(model, config, batch):
    device = model.lm_head.weight.device
    cache = PagedKVCache(config.num_hidden_layers, batch * CONTEXT // 16 + batch, 16, model.num_kv_heads, 128,
                         torch.bfloat16, device)
    for key, value in cache.layers:
        key.normal_()
        value.normal_()
    seqs = [PagedSequence(list(range(CONTEXT)), cached=CONTEXT - 1) for _ in range(batch)]
    return pack(seqs, [1] * batch, cache, False, device).model_inputs(cache.layers)


def prefill_inputs(config, tokens):
    cache = PagedKVCache(config.num_hidden_layers, tokens // 16 + 1, 16, 8, 128, torch.bfloat16, "cuda")
    seq = PagedSequence(list(range(tokens)))
    return pack([seq], [tokens], cache, True, "cuda").model_inputs(cache.layers)


def transformers_decode(layers, batch):
    """ms of one decode step of transformers' Mixtral over a 2048-token DynamicCache, or None if it fails."""
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM

    config = HFConfig(**{**MIXTRAL_8X7B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    config._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 32000, (batch, CONTEXT), device="cuda"), use_cache=True)
        cache = out.past_key_values
        step = torch.randint(0, 32000, (batch, 1), device="cuda")
        ms = time_ms(lambda: model(step, past_key_values=cache, use_cache=True), warmup=2, repeat=5)
    del model, cache
    torch.cuda.empty_cache()
    return ms


def step_times(config, batches, fp8: bool):
    """{step: graph ms} for decode at each batch and a 4096-token prefill (eager) of a model built at random."""
    times = {}
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights(fp8=fp8)).eval()
        for batch in batches:
            inputs = decode_inputs(model, config, batch)
            times[f"decode b={batch}"] = time_graph_ms(lambda: model(**inputs), repeat=10)
            del inputs
        inputs = prefill_inputs(config, 4096)
        times["prefill 4096"] = time_ms(lambda: model(**inputs), warmup=2, repeat=5)
        del inputs, model
        torch.cuda.empty_cache()
    return times


def main_fp8(args, bandwidth):
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
    bf16 = step_times(config, args.batches, fp8=False)
    fp8 = step_times(config, args.batches, fp8=True)
    rows = []
    for step in bf16:
        batch = int(step.split("=")[1]) if step.startswith("decode") else None
        floors = [f"{decode_floor_ms(config, args.layers, batch, bandwidth, b):.2f}" for b in (2, 1)] if batch else \
            ["-", "-"]
        ratio = fp8[step] / bf16[step]
        rows.append([step, floors[0], f"{bf16[step]:.2f}", floors[1], f"{fp8[step]:.2f}", f"{ratio:.2f}x"])
    print_table(f"{args.layers} Mixtral-8x7B layers, bf16 and FP8 (--quantize fp8), context {CONTEXT}, {card()}: copy "
                f"{bandwidth / 1e12:.2f} TB/s; decode: CUDA-graph replay ms, prefill: eager ms; backends {CHOSEN}",
                ["step", "bf16 floor ms", "bf16 ms", "fp8 floor ms", "fp8 ms", "fp8 / bf16"], rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 128])
    parser.add_argument("--transformers", type=int, nargs="*", default=[1, 32], help="batches to run transformers at")
    parser.add_argument("--fp8", action="store_true", help="bf16 against --quantize fp8 (see the module docstring)")
    args = parser.parse_args()
    if args.fp8:
        main_fp8(args, copy_bandwidth())
        return
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    config = MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=args.layers)
    with torch.no_grad():
        model = FlashMixtralForCausalLM("", config, RandomWeights()).eval()
        rows = []
        for batch in args.batches:
            inputs = decode_inputs(model, config, batch)
            eager = time_ms(lambda: model(**inputs), warmup=3, repeat=10)
            ms = time_graph_ms(lambda: model(**inputs), repeat=10)
            floor = decode_floor_ms(config, args.layers, batch, bandwidth)
            rows.append([f"decode b={batch}", f"{floor:.2f}", f"{eager:.2f} / {ms:.2f}", f"{ms / floor:.2f}x", ""])
            del inputs
        inputs = prefill_inputs(config, 4096)
        ms = time_ms(lambda: model(**inputs), warmup=2, repeat=5)
        flops = 2 * 4096 * args.layers * (2 * 3 * 4096 * 14336 + 4096 * 6144 + 4096 * 4096) + 4 * 4096**2 * 4096 / 2 * args.layers
        floor = flops / rate * 1e3
        rows.append(["prefill 4096", f"{floor:.2f}", f"{ms:.2f} / -", f"{ms / floor:.2f}x", ""])
        del inputs, model
        torch.cuda.empty_cache()
    for row in rows:
        batch = int(row[0].split("=")[1]) if row[0].startswith("decode") else None
        if batch in args.transformers:
            try:
                hf = transformers_decode(args.layers, batch)
                row[4] = f"{hf:.2f} ({float(row[2].split(' / ')[0]) / hf:.2f}x eager)"
            except Exception as error:
                row[4] = f"failed: {type(error).__name__}"
    print_table(f"{args.layers} Mixtral-8x7B layers, bf16, context {CONTEXT}, {card()}: copy {bandwidth / 1e12:.2f} TB/s, "
                f"matmul {rate / 1e12:.0f} TFLOP/s; backends {CHOSEN}",
                ["step", "floor ms", "ours ms eager / graph", "graph / floor", "transformers ms eager (ours / theirs)"], rows)


if __name__ == "__main__":
    main()
