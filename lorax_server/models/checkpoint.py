"""A checkpoint directory checked before it is served: tokenizer, stop ids, stored tensors, load progress.

Everything that can be refused from config.json, the tokenizer files and the safetensors headers is
refused before any weight is read, so a bad directory fails in seconds, not after the minutes a large
checkpoint takes to load. What only the load itself can tell (a tensor no layer read) is refused once the
weights are in, before anything is served.
"""

import importlib.util
import json
import logging
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import torch

from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.quantization import INPUT_SCALE_SUFFIXES, check_tensor_dtypes
from lorax_server.utils.weights import CheckpointError, Weights

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Buffers some older checkpoints saved although every model recomputes them from the config.
RECOMPUTED_SUFFIXES = (".rotary_emb.inv_freq",)
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
SHOWN_NAMES = 5  # unused tensors named in a refusal; the rest are counted


# -- tokenizer and stop ids ------------------------------------------------------------------------


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer: tokenizer.json, or else sentencepiece's tokenizer.model; its chat template
    (tokenizer_config.json or chat_template.jinja) is carried as `tokenizer.chat_template`."""
    from transformers import AutoTokenizer

    found = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not found:
        raise CheckpointError(f"{model_dir} has no tokenizer: expected tokenizer.json, or a sentencepiece "
                              f"tokenizer.model")
    if found == ["tokenizer.model"] and importlib.util.find_spec("sentencepiece") is None:
        raise CheckpointError(f"{model_dir} has only a sentencepiece tokenizer.model, and the sentencepiece package "
                              f"is not installed (pip install sentencepiece)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:  # whatever the tokenizer libraries raise, say which directory and files
        raise CheckpointError(f"the tokenizer in {model_dir} ({', '.join(found)}) does not load: {error}") from error


def eos_token_ids(model_dir: Path, config_eos) -> List[int]:
    """config.json's eos ids, then those only generation_config.json lists (chat fine-tunes often add their
    end-of-turn token there, e.g. [32000, 2]); each may be an int or a list."""
    ids = token_id_list(config_eos, "config.json eos_token_id")
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} is not valid JSON: {error}") from None
        extra = token_id_list(values.get("eos_token_id"), f"{path.name} eos_token_id")
        ids += [i for i in extra if i not in ids]
    return ids


def token_id_list(value, what: str) -> List[int]:
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{what} must be a token id or a list of them, got {value!r}")
    return list(values)


# -- stored tensors --------------------------------------------------------------------------------


def check_before_loading(weights: Weights, config) -> None:
    """From the files' headers alone: every tensor's dtype (float, or FP8 with its scale), and the layers and
    experts the checkpoint holds against those config.json describes."""
    check_tensor_dtypes(weights, weights.quantization)
    check_indices(weights.routing, LAYER_INDEX, config.num_hidden_layers, "layers", "num_hidden_layers")
    check_indices(weights.routing, EXPERT_INDEX, config.num_local_experts, "experts", "num_local_experts")


def check_indices(names, pattern: re.Pattern, expected: int, what: str, field: str) -> None:
    found = sorted({int(m.group(1)) for m in map(pattern.search, names) if m})
    if found and found != list(range(expected)):
        raise CheckpointError(f"the checkpoint holds {what} {describe_indices(found)}, but config.json's {field} is "
                              f"{expected}: config.json does not describe these weights")


def describe_indices(indices: List[int]) -> str:
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return ", ".join(map(str, indices))


def has_owner(weights: Weights, name: str) -> bool:
    """Whether a compute-only tensor belongs to a stored weight: an activation scale X.input_scale (or
    X.act_scale) to X.weight. (KV-cache scales belong to their attention layer, and are checked at load.)"""
    for suffix in INPUT_SCALE_SUFFIXES:
        if name.endswith(suffix):
            return weights.has(name[: -len(suffix)] + ".weight")
    return True


def check_all_read(weights: Weights, config) -> None:
    """After the model is built: a stored tensor that no rank read means config.json does not describe the
    checkpoint (or a layout this model does not know), so it is refused rather than served without it."""
    quantization = weights.quantization
    unused = [name for name in weights.unused() if not name.endswith(RECOMPUTED_SUFFIXES)
              and not (quantization is not None and quantization.is_compute_only(name) and has_owner(weights, name))]
    unused = unused_on_every_rank(unused, weights.process_group)
    if not unused:
        return
    shown = ", ".join(unused[:SHOWN_NAMES]) + (f" and {len(unused) - SHOWN_NAMES} more" if len(unused) > SHOWN_NAMES
                                               else "")
    hint = ""
    if config.tie_word_embeddings and "lm_head.weight" in unused:
        hint = " (config.json ties lm_head to embed_tokens, yet the checkpoint stores its own lm_head.weight)"
    count = f"{len(unused)} tensor{'s' if len(unused) > 1 else ''}"
    raise CheckpointError(f"the checkpoint has {count} this model never reads: {shown}{hint}; "
                          f"config.json does not describe these weights")


def unused_on_every_rank(unused: List[str], process_group) -> List[str]:
    """The names no rank read: with experts split over ranks, each rank reads only its own experts."""
    if isinstance(process_group, FakeGroup) or process_group.size() == 1:
        return unused
    gathered = [None] * process_group.size()
    torch.distributed.all_gather_object(gathered, unused, group=process_group)
    return sorted(set.intersection(*(set(names) for names in gathered)))


# -- progress --------------------------------------------------------------------------------------


@contextmanager
def loading_progress(weights: Weights, show: bool = True):
    """While weights load: a tqdm bar over the tensors when tqdm is installed and stderr is a terminal, else
    one log line per safetensors file as reading reaches it; then the time it took."""
    files = sorted(set(weights.routing.values()))
    total = sum(1 for name in weights.routing
                if weights.quantization is None or not weights.quantization.is_compute_only(name))
    bar = progress_bar(total) if show else None
    reached = {}

    def on_first_read(name: str, filename: Optional[Path]) -> None:
        if bar is not None:
            bar.update(1)
        elif show and filename not in reached:
            reached[filename] = len(reached) + 1
            logger.info("loading weights: file %d of %d, %s", reached[filename], len(files), filename.name)

    weights.on_first_read = on_first_read
    start = time.perf_counter()
    try:
        yield
    finally:
        weights.on_first_read = None
        if bar is not None:
            bar.close()
    if show:
        logger.info("weights loaded in %.1f s (%d files)", time.perf_counter() - start, len(files))


def progress_bar(total: int):
    if importlib.util.find_spec("tqdm") is None or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="loading weights", unit="tensor", file=sys.stderr)
