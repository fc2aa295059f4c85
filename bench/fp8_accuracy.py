"""How far `--quantize fp8` moves the embedded tiny Mixtral (trained on real text) from bf16, on real text.

The project's own Markdown files, tokenized and cut into windows, go through the model teacher-forced in fp32,
bf16 and FP8 (the float weights quantized at load); reported: the relative error of the logits against fp32 and
bf16, top-1 agreement, and how many tokens of greedy continuations agree with bf16's.

    python -m bench.fp8_accuracy [--windows 8] [--window 512]
"""

import argparse
from pathlib import Path

import torch

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models.checkpoint import load_tokenizer
from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import Weights, weight_files
from tests.tiny_mixtral import paged_logits


def load(fp8: bool, dtype: torch.dtype, device: str) -> FlashMixtralForCausalLM:
    weights = Weights(weight_files(DEFAULT_MODEL_DIR), device, dtype, FakeGroup(0, 1))
    weights.fp8_compute = fp8
    return FlashMixtralForCausalLM("", MixtralConfig.from_pretrained(DEFAULT_MODEL_DIR), weights).eval()


def text_windows(count: int, length: int):
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    text = "\n".join(p.read_text() for p in sorted(Path("docs").glob("*.md")) + [Path("README.md")])
    ids = tokenizer(text)["input_ids"]
    return [ids[i * length:(i + 1) * length] for i in range(min(count, len(ids) // length))]


@torch.no_grad()
def greedy(model, prompt, steps: int, device, dtype):
    tokens = list(prompt)
    for _ in range(steps):
        logits = paged_logits(model, [tokens], [len(tokens)], device=device, dtype=dtype, num_blocks=128)[0]
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt):]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--greedy", type=int, default=32, help="tokens of greedy continuation per window")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    windows = text_windows(args.windows, args.window)
    models = {"fp32": (load(False, torch.float32, device), torch.float32),
              "bf16": (load(False, torch.bfloat16, device), torch.bfloat16),
              "fp8": (load(True, torch.bfloat16, device), torch.bfloat16)}
    logits = {name: [paged_logits(m, [w], [len(w)], device=device, dtype=dt, num_blocks=128)[0].float()
                     for w in windows] for name, (m, dt) in models.items()}

    def compare(a, b):
        err = torch.stack([(x - y).norm() / y.norm() for x, y in zip(logits[a], logits[b])])
        agree = torch.cat([x.argmax(-1) == y.argmax(-1) for x, y in zip(logits[a], logits[b])]).float().mean()
        return f"relative error {err.mean():.4f} (max {err.max():.4f}), top-1 agreement {agree:.4f}"

    positions = sum(len(w) for w in windows)
    print(f"embedded tiny Mixtral, {positions} positions of this repository's Markdown, {device}")
    print(f"  bf16 vs fp32: {compare('bf16', 'fp32')}")
    print(f"  fp8  vs fp32: {compare('fp8', 'fp32')}")
    print(f"  fp8  vs bf16: {compare('fp8', 'bf16')}")
    same = total = 0
    for w in windows:
        prompt = w[: args.window // 2]
        a = greedy(models["fp8"][0], prompt, args.greedy, device, torch.bfloat16)
        b = greedy(models["bf16"][0], prompt, args.greedy, device, torch.bfloat16)
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        same, total = same + first_diff, total + len(a)
    print(f"  greedy continuations: fp8 equals bf16 on {same} of {total} tokens before the first difference")


if __name__ == "__main__":
    main()
