"""`lorax-server`: command-line entry points."""

import time
from pathlib import Path
from typing import List, Optional

import typer


# The tiny Mixtral shipped with the package (see lorax_server/assets/README.md).
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "tiny_mixtral"

app = typer.Typer(add_completion=False, help="The Mixtral server for LoRAX.")


@app.callback()
def main():
    """The Mixtral server for LoRAX."""


@app.command()
def generate(
    model_dir: Path = typer.Argument(DEFAULT_MODEL_DIR, help="Local checkpoint directory (default: the embedded tiny Mixtral)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt text; repeat for a batch."),
    max_new_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(0.0, help="0 is greedy; any other value samples."),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: by device)."),
):
    """Runs prefill and decode steps over the paged KV cache and prints each prompt with its continuation."""
    from lorax_server.models import get_model
    from lorax_server.utils.tokens import SamplingParams

    params = SamplingParams(temperature=temperature or 1.0, top_p=top_p, seed=seed, do_sample=temperature > 0)
    start = time.perf_counter()
    model = get_model(str(model_dir), dtype=dtype)
    loaded = time.perf_counter()
    results = model.generate(prompt, max_new_tokens, params)
    elapsed = time.perf_counter() - loaded
    for text, result in zip(prompt, results):
        typer.echo(f"{text}\033[1m{result.text}\033[0m  [{result.finish_reason}]")
    tokens = sum(len(r.generated_ids) for r in results)
    typer.echo(f"loaded in {loaded - start:.2f}s; {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tokens/s)")


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="Local checkpoint directory."),
    uds_path: str = typer.Option("/tmp/lorax-server", help="Listens on unix://UDS_PATH-RANK."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: by device)."),
    adapter_id: Optional[str] = typer.Option(None, help="A local PEFT adapter preloaded at index 1."),
    preloaded_adapter_ids: List[str] = typer.Option([], help="More local adapters, preloaded at the next indices."),
    sharded: bool = typer.Option(False, help="Tensor parallel over the torchrun ranks (gloo on CPU, NCCL on GPU)."),
    kv_cache_mib: Optional[int] = typer.Option(None, help="KV-cache budget (default: 256 MiB on CPU, 85% of free GPU memory)."),
    expert_parallel: bool = typer.Option(False, help="With --sharded: split the experts over ranks, not their ffn."),
    log_level: str = typer.Option("INFO"),
):
    """Serves LoRAX's shard protocol (generate.v1.LoraxService) until terminated."""
    import logging

    from lorax_server.launch import load_and_serve

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapters = ([adapter_id] if adapter_id else []) + list(preloaded_adapter_ids)
    load_and_serve(str(model_dir), uds_path, dtype, adapters, sharded,
                   kv_cache_mib << 20 if kv_cache_mib else None, expert_parallel=expert_parallel)


@app.command()
def demo(max_new_tokens: int = typer.Option(32, min=1)):
    """Serves the embedded model with its two embedded adapters and sends one mixed batch over gRPC."""
    from lorax_server.demo import run_demo

    run_demo(max_new_tokens)


if __name__ == "__main__":
    app()
