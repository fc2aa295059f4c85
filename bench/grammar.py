"""What structured output costs a decode step: a batch with half of its rows constrained by JSON schemas
against the same batch with none, through the batched sampler (engine.sampler + engine.grammar).

The model is a fixed time (--model-ms): on CUDA a kernel that spins that long on the device, queued before
the logits as a forward pass is, so the host builds the masks while the device runs it (as in the engine);
on the CPU the host waits for it first (no overlap). Two ratios are printed:
- measured: wall time per step (model + sampling), constrained / free;
- serial bound: (model + constrained sampling) / (model + free sampling), with the sampling timed alone,
  i.e. as if none of the mask's host work overlapped the forward pass. Target: <= 1.10.
Constrained rows cycle over realistic schemas (tool call, nested record, list of objects, enums and
bounded numbers); a row whose output is complete starts again on its schema, so half the batch stays
constrained at every step. Logits are random, so outputs explore the schemas' strings and numbers.

The tokenizer is a 32,000-token BPE over "▁"-prefixed words with byte fallback (Llama and Mistral's
shape), trained here on Python's own sources in a few seconds, or any local tokenizer (--tokenizer DIR).

    python -m bench.grammar [--batch 64] [--constrained 32] [--model-ms 30] [--steps 200] [--sampled]
"""

import argparse
import glob
import json
import statistics
import sysconfig
import time

import torch

from lorax_server.engine.grammar import GrammarCompiler, configured_threads, host_bitmask
from lorax_server.engine.sampler import BatchSampler
from lorax_server.utils.tokens import NextTokenChooser, SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city", "unit"], "additionalProperties": False}},
     "required": ["name", "arguments"], "additionalProperties": False},
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.(com|org|net)$"},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 40}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5}},
     "required": ["name", "age", "address"], "additionalProperties": False},
    {"type": "array", "minItems": 1, "maxItems": 6, "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0}, "title": {"type": "string", "maxLength": 30},
        "done": {"type": "boolean"}}, "required": ["id", "title", "done"], "additionalProperties": False}},
    {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "topics": {"type": "array", "items": {"enum": ["price", "quality", "delivery", "support"]},
                   "minItems": 1, "maxItems": 4}},
     "required": ["sentiment", "confidence", "topics"], "additionalProperties": False},
]


def llama_shaped_tokenizer(vocab_size: int = 32000, text_chars: int = 6_000_000):
    """A Rust-backed BPE of `vocab_size` ids over "▁"-prefixed words with 256 byte-fallback tokens and
    Llama's decoder, trained on Python's standard library sources (no download)."""
    from bench.tokenizers import byte_fallback_bpe

    def texts():
        total = 0
        for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            yield text
            if total > text_chars:
                return

    return byte_fallback_bpe(texts(), vocab_size - 256)


class Row:
    """The fields of the engine's Request that the sampler reads."""

    def __init__(self, params: SamplingParams, device, grammar=None, schema: str = ""):
        self.chooser = NextTokenChooser(params, device)
        self.tokens = [1]
        self.counts = None
        self.grammar = grammar
        self.schema = schema


class FakeModel:
    """A forward pass of `ms` milliseconds that ends in `logits` [B, V]: on CUDA a spinning kernel queued
    before a copy of the logits (so the host runs ahead of it), elsewhere a host sleep."""

    def __init__(self, ms: float, logits: torch.Tensor):
        self.ms, self.logits = ms, logits
        self.cycles = calibrate_sleep() * ms if logits.is_cuda and ms > 0 else 0

    def __call__(self) -> torch.Tensor:
        if self.cycles:
            torch.cuda._sleep(int(self.cycles))
        elif self.ms > 0:
            time.sleep(self.ms / 1e3)
        return self.logits.clone()


def calibrate_sleep() -> float:
    """Cycles of torch.cuda._sleep per millisecond on this device."""
    torch.cuda._sleep(1_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / start.elapsed_time(end)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(rows, model, sampler, compiler, steps: int, device, with_model: bool) -> dict:
    """Median ms per step: model + sampling (`with_model`), or sampling alone from ready logits together
    with the host time of the step's masks. A row whose output is complete starts again on its schema."""
    step_ms, mask_ms, finished = [], [], 0
    for _ in range(steps + 5):  # the first five warm up
        logits = None
        if not with_model:
            logits = model.logits.clone()
            constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
            if constrained:
                start = time.perf_counter()
                host_bitmask(len(rows), constrained)
                mask_ms.append((time.perf_counter() - start) * 1e3)
        sync(device)
        start = time.perf_counter()
        choices = sampler.step(model() if with_model else logits, rows)
        sync(device)
        step_ms.append((time.perf_counter() - start) * 1e3)
        for r, choice in zip(rows, choices):
            assert choice.error is None, choice.error
            r.tokens.append(choice.token)
            if r.grammar is not None and r.grammar.finished:
                finished += 1
                r.grammar = compiler.state(r.schema)
    return {"step": statistics.median(step_ms[5:]), "masks": statistics.median(mask_ms[5:]) if mask_ms else 0.0,
            "finished": finished}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--constrained", type=int, default=32)
    parser.add_argument("--model-ms", type=float, default=30.0, help="the forward pass of one decode step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokenizer", default=None, help="a local tokenizer directory instead of the trained one")
    parser.add_argument("--sampled", action="store_true", help="rows sample (temperature, top-p) instead of greedy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    start = time.perf_counter()
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = llama_shaped_tokenizer(args.vocab)
    built = time.perf_counter() - start
    vocab = max(args.vocab, len(tokenizer))
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    start = time.perf_counter()
    compiler.warm()
    ll_built = time.perf_counter() - start
    schemas = [json.dumps(s) for s in SCHEMAS]
    compile_ms = []
    for schema in schemas:
        start = time.perf_counter()
        compiler.compile(schema)
        compile_ms.append((time.perf_counter() - start) * 1e3)

    params = SamplingParams(temperature=0.7, top_p=0.95, seed=0) if args.sampled else SamplingParams()
    logits = torch.randn(args.batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
    logits = logits.to(torch.bfloat16).to(device)
    model = FakeModel(args.model_ms, logits)

    def rows(constrained: int):
        out = [Row(params, device) for _ in range(args.batch)]
        for k, i in enumerate(range(0, args.batch, max(1, args.batch // max(constrained, 1)))[:constrained]):
            out[i].schema = schemas[k % len(schemas)]
            out[i].grammar = compiler.state(out[i].schema)
        return out

    results = {}
    for label, count in (("free", 0), ("constrained", args.constrained)):
        batch, sampler = rows(count), BatchSampler(device)
        results[label] = {"alone": run(batch, model, sampler, compiler, args.steps, device, with_model=False),
                          "full": run(batch, model, sampler, compiler, args.steps, device, with_model=True)}
    free, constrained = results["free"], results["constrained"]
    serial = (args.model_ms + constrained["alone"]["step"]) / (args.model_ms + free["alone"]["step"])
    measured = constrained["full"]["step"] / free["full"]["step"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nStructured output, batch {args.batch} ({args.constrained} constrained), vocab {vocab}, "
          f"{'sampled' if args.sampled else 'greedy'}, model {args.model_ms} ms, {name}, "
          f"{configured_threads()} mask threads")
    print(f"tokenizer ready in {built:.1f} s; llguidance's tokenizer built in {ll_built * 1e3:.0f} ms; "
          f"compile per schema: {', '.join(f'{ms:.1f}' for ms in compile_ms)} ms; "
          f"{constrained['alone']['finished'] + constrained['full']['finished']} outputs completed")
    print("| batch | sampling alone ms | its masks on the host ms | model + sampling ms |")
    print("|---|---|---|---|")
    print(f"| {args.batch} free | {free['alone']['step']:.3f} | - | {free['full']['step']:.2f} |")
    print(f"| {args.batch}, {args.constrained} constrained | {constrained['alone']['step']:.3f} | "
          f"{constrained['alone']['masks']:.3f} | {constrained['full']['step']:.2f} |")
    print(f"ratio measured {measured:.3f}x, serial bound {serial:.3f}x (target <= 1.10)")


if __name__ == "__main__":
    main()
