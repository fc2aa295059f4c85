"""Build the tiny embedded Mixtral model used as LoRAX's offline default.

Everything here runs offline on any machine with CPython, torch, transformers
and tokenizers: the training text is the Python reference-manual prose that
CPython ships in ``pydoc_data.topics`` (what ``help("for")`` prints).

The script
  1. gathers that text (optionally plus a fixed list of stdlib docstrings),
  2. trains a byte-level BPE tokenizer (<unk>=0, <s>=1, </s>=2, as Mixtral expects),
  3. trains a tiny ``MixtralForCausalLM`` (4 layers, 4 experts, top-2) for a
     bounded number of steps / wall-clock time on CPU,
  4. saves tokenizer + model (bfloat16, transformers' on-disk Mixtral names).

Usage::

    python -m lorax_server.assets.build_tiny_mixtral OUT_DIR [--minutes 9] [--steps N] [--seed 0]

Identical arguments on the same Python/torch version give the same tokenizer and,
when the run is bounded by ``--steps`` rather than ``--minutes``, the same weights.
"""

import argparse
import importlib
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from lorax_server.assets.training import train

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (Mixtral: bos=1, eos=2)
DOCSTRING_MODULES = (  # only used with --with-docstrings; a fixed list keeps it deterministic
    "argparse", "collections", "contextlib", "dataclasses", "functools", "itertools",
    "json", "logging", "os", "pathlib", "re", "string", "textwrap", "typing",
)
SAMPLE_PROMPTS = ("The for statement", "A list is")


def gather_documents(with_docstrings: bool) -> list:
    """Return a deterministic list of English documents shipped with CPython."""
    from pydoc_data.topics import topics  # dict: topic name -> reference-manual text

    docs = [topics[name].strip() for name in sorted(topics)]
    if with_docstrings:
        for mod_name in DOCSTRING_MODULES:
            mod = importlib.import_module(mod_name)
            for name in ["__doc__"] + sorted(dir(mod)):
                obj = mod if name == "__doc__" else getattr(mod, name)
                doc = getattr(obj, "__doc__", None) if not name.startswith("_") or obj is mod else None
                if isinstance(doc, str) and len(doc) > 200:
                    docs.append(doc.strip())
    return docs


def train_tokenizer(docs: list, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless decode), wrapped so AutoTokenizer can load it."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # inserted first -> ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no <unk> ever needed
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    # Like Llama/Mixtral tokenizers: prepend <s> when add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )


def make_model(vocab_size: int, args) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        sliding_window=None,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=0.02,  # keep all 4 experts in use
        bos_token_id=1,
        eos_token_id=2,
    )
    return MixtralForCausalLM(config)


def lm_and_aux_loss(model, batch):
    out = model(input_ids=batch, labels=batch, output_router_logits=True)
    return out.loss, out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--minutes", type=float, default=9.0, help="training wall-clock budget (0 = no limit)")
    p.add_argument("--steps", type=int, default=100_000, help="maximum optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--with-docstrings", action="store_true", help="also train on some stdlib docstrings")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    t0 = time.time()

    # 1-2. Text and tokenizer. All documents become one token stream: <s> doc </s> <s> doc </s> ...
    docs = gather_documents(args.with_docstrings)
    tokenizer = train_tokenizer(docs, args.vocab)
    stream = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        stream += [1] + enc.ids + [2]
    data = torch.tensor(stream, dtype=torch.long)
    print(f"{len(docs)} documents, {sum(map(len, docs))} chars, {len(data)} tokens, vocab {len(tokenizer)}")

    # 3. Model and training. The reported loss is the LM loss alone (without the router's aux loss).
    model = make_model(len(tokenizer), args)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    train(model, model.parameters(), data, args, lm_and_aux_loss, warmup=100, weight_decay=0.1, log_every=50)

    # 4. Save: tokenizer files + bf16 weights (transformers writes Mixtral's per-expert w1/w2/w3 names).
    for prompt in SAMPLE_PROMPTS:
        print(f"sample: {greedy(model, tokenizer, prompt)!r}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out_dir)
    model.generation_config.pad_token_id = None
    model.to(torch.bfloat16).save_pretrained(args.out_dir)
    size = sum(f.stat().st_size for f in args.out_dir.iterdir() if f.is_file())
    print(f"saved to {args.out_dir} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
