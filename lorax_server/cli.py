"""`lorax-server`: command-line entry points.

`serve` and `download-weights` take upstream lorax-server's arguments, so that the LoRAX launcher can start
this shard with its exact command lines (launcher/src/main.rs):

    lorax-server download-weights MODEL_ID --extension .safetensors --logger-level INFO --json-output \\
        --source SOURCE --adapter-source ADAPTER_SOURCE [--revision R] [--adapter-id A] [--embedding-dim N]
    lorax-server serve MODEL_ID --uds-path PATH --logger-level INFO --json-output --source SOURCE \\
        --adapter-source ADAPTER_SOURCE [--adapter-id A] [--trust-remote-code] [--sharded] [--quantize Q] \\
        [--compile] [--speculative-tokens N] [--preloaded-adapter-ids ID ...] [--merge-adapter-weights] \\
        [--preloaded-adapter-source S] [--dtype D] [--revision R] [--otlp-endpoint URL] [--embedding-dim N]

(and this server's own options, such as `--kv-cache-dtype fp8`), with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
and CUDA_MEMORY_FRACTION in the environment. What
cannot apply here (downloads, quantization, speculation, embeddings, s3/pbase sources) is refused by
name. Any error is one line on stderr (and, with --json-output, one ERROR record on stdout) and a
non-zero exit status; only a bug prints a traceback.
"""

import logging
import os
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import List, Optional

import click
import typer

# The tiny Mixtral shipped with the package (see lorax_server/assets/README.md).
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "tiny_mixtral"
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

logger = logging.getLogger("lorax_server.cli")  # not __name__: that is "__main__" under `python -m`


class CliError(Exception):
    """A refusal or a user error: printed as one line, exit status 1."""


class Quantization(str, Enum):  # upstream's choices; fp8 alone is served here
    bitsandbytes = "bitsandbytes"
    bitsandbytes_nf4 = "bitsandbytes-nf4"
    bitsandbytes_fp4 = "bitsandbytes-fp4"
    gptq = "gptq"
    awq = "awq"
    eetq = "eetq"
    hqq_4bit = "hqq-4bit"
    hqq_3bit = "hqq-3bit"
    hqq_2bit = "hqq-2bit"
    fp8 = "fp8"
    fp8_kv = "fp8-kv"


class KvCacheDtype(str, Enum):  # this server's own: the KV cache in the compute dtype, or FP8 (e4m3)
    auto = "auto"
    fp8 = "fp8"


class Dtype(str, Enum):  # upstream's two, and float32, which this server serves as float32
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


_json_logging = False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def _report(message: str) -> None:
    """An error, as one line on stderr (and as an ERROR record when the launcher reads JSON logs)."""
    if _json_logging:
        logger.error("%s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)


def _usage_errors():
    """Bad usage (unknown option, invalid value, missing argument): click's exceptions, or the ones of the click
    that recent typer versions carry inside (typer.TyperException)."""
    return tuple(kind for kind in (click.ClickException, getattr(typer, "TyperException", None))
                 if isinstance(kind, type) and kind is not Exception)


def _aborts():
    return tuple({click.Abort, getattr(typer, "Abort", click.Abort), KeyboardInterrupt})


def _user_errors():
    """Exceptions that are the user's input or environment, not a bug: reported as one line."""
    errors = [CliError, ValueError, OSError]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


class LoraxCli(typer.Typer):
    """A Typer app whose errors are one line each (click's usage errors included), never a traceback."""

    def __call__(self, args=None, prog_name: Optional[str] = None):
        command = typer.main.get_command(self)
        try:
            result = command.main(args=args, prog_name=prog_name, standalone_mode=False)
        except _usage_errors() as error:
            message = error.format_message() if hasattr(error, "format_message") else str(error)
            where = f" (see {error.ctx.command_path} --help)" if getattr(error, "ctx", None) is not None else ""
            _report(f"{' '.join(message.split())}{where}")
            sys.exit(getattr(error, "exit_code", 2))
        except _aborts():
            sys.exit(130)
        except _user_errors() as error:
            if logging.getLogger("lorax_server").isEnabledFor(logging.DEBUG):
                traceback.print_exc()  # --logger-level DEBUG: where the refusal came from
            _report(_one_line(error))
            sys.exit(1)
        except Exception:
            if _json_logging:
                logger.exception("lorax-server failed")
            raise
        sys.exit(result if isinstance(result, int) else 0)


app = LoraxCli(add_completion=False, help="The Mixtral server for LoRAX.", pretty_exceptions_enable=False)


@app.callback()
def main():
    """The Mixtral server for LoRAX."""


def _setup_logging(logger_level: str, json_output: bool) -> None:
    global _json_logging
    from lorax_server.utils.logging_setup import setup_logging

    try:
        setup_logging(logger_level, json_output)
    except ValueError as error:
        raise CliError(f"--logger-level {logger_level}: {error}") from None
    _json_logging = json_output


def _check_source(option: str, value: str, used: bool = True) -> None:
    """Refuses an unknown source name always, and a source this server cannot read from when it is used."""
    from lorax_server.utils.sources import SOURCES, SourceError, check_source

    if value not in SOURCES or used:
        try:
            check_source(value)
        except SourceError as error:
            raise CliError(f"{option} {value}: {error}") from None


def _resolve(what: str, model_or_adapter_id: str, source: str, revision: Optional[str] = None) -> Path:
    from lorax_server.utils.sources import resolve

    try:
        return resolve(model_or_adapter_id, source, revision)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(f"{what} {model_or_adapter_id}: {error}") from None


@app.command()
def generate(
    model_dir: Path = typer.Argument(DEFAULT_MODEL_DIR, help="Local checkpoint directory (default: the embedded tiny Mixtral)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt text; repeat for a batch."),
    max_new_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(0.0, help="0 is greedy; any other value samples."),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: by device)."),
    kv_cache_dtype: KvCacheDtype = typer.Option(KvCacheDtype.auto, "--kv-cache-dtype",
                                                help="auto (the compute dtype) or fp8."),
):
    """Runs prefill and decode steps over the paged KV cache and prints each prompt with its continuation."""
    from lorax_server.models import get_model
    from lorax_server.utils.tokens import SamplingParams

    params = SamplingParams(temperature=temperature or 1.0, top_p=top_p, seed=seed, do_sample=temperature > 0)
    start = time.perf_counter()
    model = get_model(str(model_dir), dtype=dtype, kv_cache_dtype=kv_cache_dtype.value)
    loaded = time.perf_counter()
    results = model.generate(prompt, max_new_tokens, params)
    elapsed = time.perf_counter() - loaded
    for text, result in zip(prompt, results):
        typer.echo(f"{text}\033[1m{result.text}\033[0m  [{result.finish_reason}]")
    tokens = sum(len(r.generated_ids) for r in results)
    typer.echo(f"loaded in {loaded - start:.2f}s; {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tokens/s)")


@app.command()
def serve(
    model_id: Optional[str] = typer.Argument(
        None, metavar="[MODEL_ID]", show_default=False,
        help="Checkpoint directory, or (source hub) a model id in the local Hugging Face cache; default: the "
             "embedded tiny Mixtral."),
    adapter_id_argument: Optional[str] = typer.Argument(
        None, metavar="[ADAPTER_ID]", show_default=False, help="Same as --adapter-id."),
    adapter_id: str = typer.Option(
        "", "--adapter-id",
        help="Adapter (from --adapter-source) that answers base-model requests: merged into the base weights."),
    revision: Optional[str] = typer.Option(None, help="Snapshot of a hub model id in the local cache (a branch, tag or commit)."),
    sharded: bool = typer.Option(
        False, help="One process per rank from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (LoRAX launcher or torchrun)."),
    quantize: Optional[Quantization] = typer.Option(
        None, help="fp8: attention and experts compute in FP8 (an FP8 checkpoint as stored, a float one quantized at "
                   "load; a GPU needs FP8 tensor cores); the other methods are refused."),
    compile: bool = typer.Option(
        False, "--compile",
        help="Decode from CUDA graphs on a GPU (the launcher passes it unless --eager); without it, decode eagerly."),
    dtype: Optional[Dtype] = typer.Option(None, help="Default: bfloat16 on a GPU, float32 on a CPU."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Accepted; no remote code ever runs."),
    uds_path: Path = typer.Option(Path("/tmp/lorax-server"), help="Listens on unix://UDS_PATH-RANK."),
    logger_level: str = typer.Option("INFO", "--logger-level", "--log-level"),
    json_output: bool = typer.Option(False, "--json-output", help="One JSON object (loguru's shape) per log line."),
    otlp_endpoint: Optional[str] = typer.Option(None, help="OpenTelemetry collector for traces (needs opentelemetry)."),
    source: str = typer.Option("hub", help="hub (a directory, else the local Hugging Face cache) or local."),
    adapter_source: str = typer.Option("hub", help="Source of --adapter-id and default of --preloaded-adapter-source."),
    speculative_tokens: int = typer.Option(0, min=0, help="Only 0: this server does no speculative decoding."),
    preloaded_adapter_ids: List[str] = typer.Option([], help="Adapters preloaded at indices 1, 2, ... (repeat)."),
    merge_adapter_weights: bool = typer.Option(False, "--merge-adapter-weights", help="Merge --adapter-id into the base weights."),
    preloaded_adapter_source: Optional[str] = typer.Option(None, help="Default: --adapter-source."),
    embedding_dim: Optional[int] = typer.Option(None, help="Refused: Mixtral has no embedding head."),
    kv_cache_mib: Optional[int] = typer.Option(
        None, min=1, help="KV-cache budget (default: 256 MiB on CPU, 85% of free GPU memory within CUDA_MEMORY_FRACTION)."),
    expert_parallel: bool = typer.Option(False, help="With --sharded: split the experts over ranks, not their ffn."),
    kv_cache_dtype: KvCacheDtype = typer.Option(
        KvCacheDtype.auto, "--kv-cache-dtype",
        help="auto: the KV cache in the compute dtype; fp8: float8_e4m3 entries (twice the tokens), scaled per layer "
             "by the checkpoint's self_attn.k_scale / v_scale (1.0 without them); a GPU needs FP8 support."),
):
    """Serves LoRAX's shard protocol (generate.v1.LoraxService) until terminated."""
    _setup_logging(logger_level, json_output)
    if adapter_id_argument and adapter_id and adapter_id_argument != adapter_id:
        raise CliError(f"ADAPTER_ID {adapter_id_argument} and --adapter-id {adapter_id} differ: give one adapter")
    adapter_id = adapter_id or adapter_id_argument or ""
    quantize = quantize.value if quantize is not None else None
    dtype = dtype.value if dtype is not None else None
    _refuse_what_cannot_apply(quantize, dtype, speculative_tokens, embedding_dim, merge_adapter_weights, adapter_id)
    preloaded_source = preloaded_adapter_source or adapter_source
    _check_serve_sources(source, adapter_source, preloaded_adapter_source, bool(adapter_id),
                         bool(preloaded_adapter_ids))
    if sharded:
        _check_distributed_environment()
    model_id = model_id or str(DEFAULT_MODEL_DIR)
    model_dir = _resolve("MODEL_ID", model_id, source, revision)
    if adapter_id:
        _resolve("--adapter-id", adapter_id, adapter_source)
    for preloaded_id in preloaded_adapter_ids:
        _resolve("--preloaded-adapter-ids", preloaded_id, preloaded_source)
    rank = os.getenv("RANK", "0") if sharded else "0"
    _check_process(f"{uds_path}-{rank}")
    logger.info("serving %s (%s) on unix://%s-%s", model_id, model_dir, uds_path, rank)
    if trust_remote_code:
        logger.info("--trust-remote-code: accepted; no remote code runs (Mixtral is built in)")
    if otlp_endpoint is not None:
        from lorax_server.tracing import setup_tracing

        setup_tracing(shard=rank, otlp_endpoint=otlp_endpoint)
    from lorax_server.launch import load_and_serve

    load_and_serve(model_id, str(uds_path), dtype, list(preloaded_adapter_ids), sharded,
                   kv_cache_mib << 20 if kv_cache_mib else None, expert_parallel=expert_parallel,
                   adapter_id=adapter_id, revision=revision, compile=compile, trust_remote_code=trust_remote_code,
                   source=source, adapter_source=adapter_source, preloaded_adapter_source=preloaded_source,
                   merge_adapter_weights=merge_adapter_weights, quantize=quantize,
                   kv_cache_dtype=kv_cache_dtype.value)


def _refuse_what_cannot_apply(quantize: Optional[str], dtype: Optional[str], speculative_tokens: int,
                              embedding_dim: Optional[int], merge_adapter_weights: bool, adapter_id: str) -> None:
    """The launcher's options this server cannot honour, each refused by name (upstream's meaning or why not)."""
    if embedding_dim is not None:
        raise CliError(f"--embedding-dim {embedding_dim}: this server serves Mixtral, a causal LM with no embedding "
                       f"head (Embed answers UNIMPLEMENTED)")
    if dtype is not None and quantize is not None:
        raise CliError("--dtype and --quantize: only one of them may be set, as both decide how the model is "
                       "initialized")
    if quantize not in (None, "fp8"):
        raise CliError(f"--quantize {quantize}: this server serves float16, bfloat16 or float32 weights (--dtype), "
                       f"FP8 checkpoints, and FP8 compute (--quantize fp8)")
    if speculative_tokens > 0:
        raise CliError(f"--speculative-tokens {speculative_tokens}: this server does no speculative decoding "
                       f"(Info reports speculate 0); use 0")
    if merge_adapter_weights and not adapter_id:
        raise CliError("--merge-adapter-weights needs --adapter-id: there is no adapter to merge")


def _check_serve_sources(source: str, adapter_source: str, preloaded_adapter_source: Optional[str],
                         has_adapter_id: bool, has_preloaded: bool) -> None:
    _check_source("--source", source)
    _check_source("--adapter-source", adapter_source,
                  used=has_adapter_id or (has_preloaded and preloaded_adapter_source is None))
    if preloaded_adapter_source is not None:
        _check_source("--preloaded-adapter-source", preloaded_adapter_source, used=has_preloaded)


def _check_distributed_environment() -> None:
    missing = [name for name in DISTRIBUTED_ENV if os.getenv(name) is None]
    if missing:
        raise CliError(f"--sharded needs {', '.join(DISTRIBUTED_ENV)} in the environment (the LoRAX launcher "
                       f"and torchrun set them); missing: {', '.join(missing)}")


def _check_process(socket_path: str) -> None:
    """What would fail after the weights load (minutes for a real model) fails now: a live socket or a bad
    path, and a CUDA_MEMORY_FRACTION out of range."""
    from lorax_server.models import cuda_memory_fraction
    from lorax_server.server import SocketInUse, claim_socket

    try:
        claim_socket(socket_path)
        cuda_memory_fraction()
    except (SocketInUse, ValueError) as error:
        raise CliError(str(error)) from None


def _weight_files(directory: Path, extension: str) -> List[Path]:
    """Upstream's weight files of a directory: its files (not subfolders) ending with `extension`, less
    training arguments."""
    return sorted(f for f in directory.iterdir() if f.is_file() and f.name.endswith(extension)
                  and not any(word in f.name for word in ("arguments", "args", "training")))


def _check_weights(what: str, model_or_adapter_id: str, directory: Path, extension: str, auto_convert: bool,
                   is_adapter: bool) -> None:
    files = _weight_files(directory, extension)
    if not files and extension == ".safetensors" and auto_convert:
        pytorch = _weight_files(directory, ".bin")
        if pytorch and is_adapter:  # the PEFT loader reads adapter_model.bin as it is
            logger.info("%s %s: %d PyTorch weight files in %s (read as they are, no conversion needed)",
                        what, model_or_adapter_id, len(pytorch), directory)
            return
        if pytorch:
            raise CliError(f"{what} {model_or_adapter_id}: {directory} holds {len(pytorch)} PyTorch .bin weight "
                           f"files and no .safetensors: --auto-convert is not done here; convert them to "
                           f"safetensors first")
    if not files:
        raise CliError(f"{what} {model_or_adapter_id}: no *{extension} weight files in {directory}")
    if extension == ".safetensors":  # present, but whole? (a header names every tensor's bytes: cheap to check)
        from lorax_server.utils.weights import CheckpointError, open_safetensors

        for file in files:
            try:
                open_safetensors(file).keys()
            except CheckpointError as error:
                raise CliError(f"{what} {model_or_adapter_id}: {error}") from None
    logger.info("%s %s: %d %s weight files in %s", what, model_or_adapter_id, len(files), extension, directory)


@app.command("download-weights")
def download_weights(
    model_id: str = typer.Argument(..., metavar="MODEL_ID",
                                   help="Checkpoint directory, or (source hub) a model id in the local cache."),
    revision: Optional[str] = typer.Option(None, help="Snapshot of a hub model id in the local cache."),
    extension: str = typer.Option(".safetensors", help="Weight files to look for."),
    auto_convert: bool = typer.Option(True, help="Upstream converts .bin weights; here .bin model weights are refused."),
    logger_level: str = typer.Option("INFO", "--logger-level", "--log-level"),
    json_output: bool = typer.Option(False, "--json-output"),
    source: str = typer.Option("hub", help="hub (a directory, else the local Hugging Face cache) or local."),
    adapter_id: str = typer.Option("", help="An adapter to check too (from --adapter-source)."),
    adapter_source: str = typer.Option("hub"),
    api_token: Optional[str] = typer.Option(None, help="Accepted; nothing is downloaded."),
    embedding_dim: Optional[int] = typer.Option(None, help="Refused: Mixtral has no embedding head."),
):
    """Nothing can be downloaded here: checks that the weights are already on this machine (exit 0 when they
    are, one line and a non-zero exit when not), as upstream does before downloading."""
    _setup_logging(logger_level, json_output)
    if embedding_dim is not None:
        raise CliError(f"--embedding-dim {embedding_dim}: this server serves Mixtral, a causal LM with no embedding "
                       f"head")
    _check_source("--source", source)
    _check_source("--adapter-source", adapter_source, used=bool(adapter_id))
    model_dir = _resolve("MODEL_ID", model_id, source, revision)
    _check_weights("model", model_id, model_dir, extension, auto_convert, is_adapter=False)
    if adapter_id:  # upstream: no revision for the adapter
        adapter_dir = _resolve("--adapter-id", adapter_id, adapter_source)
        _check_weights("adapter", adapter_id, adapter_dir, extension, auto_convert, is_adapter=True)
    logger.info("Files are already present on the host. Skipping download.")


@app.command()
def demo(max_new_tokens: int = typer.Option(32, min=1)):
    """Serves the embedded model with its two embedded adapters and sends one mixed batch over gRPC."""
    from lorax_server.demo import run_demo

    run_demo(max_new_tokens)


if __name__ == "__main__":
    app()
