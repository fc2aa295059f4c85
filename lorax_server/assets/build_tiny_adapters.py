"""Build two tiny PEFT LoRA adapters for the embedded ``tiny_mixtral`` model.

They exist so a demo can batch the base model and two adapters together and see
three clearly different outputs. Both train offline on text every CPython ships:

  * ``zen``   -- the Zen of Python (the ``this`` module, rot13-decoded), repeated.
                 Targets attention and the MoE experts (w1/w2/w3), so it exercises
                 expert LoRA; prompts drift into Zen-of-Python aphorisms.
  * ``shout`` -- the base model's own training text (``pydoc_data.topics``) in
                 UPPER CASE. Targets attention and ``lm_head``; output comes out in capitals.

Usage::

    python -m lorax_server.assets.build_tiny_adapters OUT_DIR [--minutes 3] [--steps N] [--seed 0]

``--minutes`` is the training budget *per adapter*. Each adapter is saved with
``save_pretrained`` to ``OUT_DIR/<name>/`` (adapter_config.json + adapter_model.safetensors),
then reloaded from disk with ``PeftModel.from_pretrained`` and compared with the base model.
As with ``build_tiny_mixtral``, only a ``--steps``-bounded run (``--minutes 0``) is bit-reproducible.
"""

import argparse
import contextlib
import importlib
import io
import math
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorax_server.assets.training import train

BASE_DIR = Path(__file__).parent / "tiny_mixtral"
SAMPLE_PROMPTS = ("The for statement", "Beautiful is")
MAX_TOTAL_BYTES = 2_000_000  # both adapters together must stay below this

# name -> LoRA config. zen's w1/w2/w3 become PEFT target_parameters on transformers 5's fused experts.
ADAPTERS = {
    "zen": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
    "shout": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]),
}


def zen_documents() -> list:
    """The Zen of Python, decoded like ``this`` does it (rot13), without printing it."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        this = importlib.import_module("this")
    return ["".join(this.d.get(c, c) for c in this.s).strip()]


def shout_documents() -> list:
    """The base model's training documents, upper-cased."""
    from pydoc_data.topics import topics

    return [topics[name].strip().upper() for name in sorted(topics)]


def token_stream(tokenizer, docs: list, min_tokens: int) -> torch.Tensor:
    """<s> doc </s> <s> doc </s> ..., repeated until at least ``min_tokens`` long."""
    one_pass = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        one_pass += [1] + enc.ids + [2]
    return torch.tensor(one_pass * max(1, math.ceil(min_tokens / len(one_pass))), dtype=torch.long)


def load_base():
    return AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def lm_loss(model, batch):
    loss = model(input_ids=batch, labels=batch).loss  # the router is frozen: no aux loss to report apart
    return loss, loss.item()


def train_adapter(name: str, data: torch.Tensor, args) -> float:
    """Train one LoRA adapter on ``data`` (fp32), save it to OUT_DIR/name; return the final loss."""
    torch.manual_seed(args.seed)  # same LoRA init and batches whatever was trained before
    model = get_peft_model(load_base(), ADAPTERS[name])
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    final, _ = train(model, params, data, args, lm_loss, warmup=20, weight_decay=0.0, log_every=25, tag=f"[{name}] ")
    # A repo-relative base path instead of this machine's absolute one; drop PEFT's boilerplate model card.
    model.peft_config["default"].base_model_name_or_path = "lorax_server/assets/tiny_mixtral"
    model.save_pretrained(args.out_dir / name)
    (args.out_dir / name / "README.md").unlink(missing_ok=True)
    return final


def shrink_to_bf16(adapter_dir: Path) -> None:
    """Re-save adapter_model.safetensors with the same keys but bfloat16 tensors."""
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per adapter (0 = no limit)")
    p.add_argument("--steps", type=int, default=100_000, help="maximum optimizer steps per adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()

    torch.set_num_threads(2)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    texts = {"zen": zen_documents(), "shout": shout_documents()}

    # 1. Train and save each adapter.
    losses = {}
    for name, docs in texts.items():
        data = token_stream(tokenizer, docs, min_tokens=4 * args.seq_len)
        print(f"[{name}] {len(docs)} documents, {sum(map(len, docs))} chars, {len(data)} tokens in the stream")
        losses[name] = train_adapter(name, data, args)

    # 2. Size check: if everything together is over 2 MB, store the tensors as bfloat16.
    total = sum(dir_size(args.out_dir / name) for name in ADAPTERS)
    if total > MAX_TOTAL_BYTES:
        print(f"{total / 1e6:.2f} MB > {MAX_TOTAL_BYTES / 1e6:.0f} MB: re-saving tensors as bfloat16")
        for name in ADAPTERS:
            shrink_to_bf16(args.out_dir / name)
    for name in ADAPTERS:
        print(f"{args.out_dir / name}: {dir_size(args.out_dir / name) / 1e3:.0f} kB")

    # 3. Reload what was saved and compare greedy continuations: base vs each adapter.
    for prompt in SAMPLE_PROMPTS:
        print(f"base : {greedy(load_base(), tokenizer, prompt)!r}")
        for name in ADAPTERS:
            model = PeftModel.from_pretrained(load_base(), args.out_dir / name)
            print(f"{name:5s}: {greedy(model, tokenizer, prompt)!r}")
    print(f"final losses: {', '.join(f'{k} {v:.3f}' for k, v in losses.items())}; "
          f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
