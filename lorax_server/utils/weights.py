"""Prefix-addressed, tensor-parallel reads from safetensors checkpoints.

Modules load themselves: each constructor asks `Weights` for the tensors under its prefix, and the
sharding happens at read time, so a rank never materialises more than its slice of a weight.
"""

import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from safetensors import safe_open


# safetensors' names of the float8 dtypes (what `read_stored` gives on the meta device)
FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: a missing tensor, a wrong shape, an unshardable size."""


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, the index) as a dict, or a CheckpointError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable JSON file: {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def open_safetensors(path: Path):
    """safe_open, with an unreadable file (truncated, not safetensors) reported as a CheckpointError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                              f"was it downloaded completely?") from None


def weight_files(model_dir) -> List[Path]:
    """The safetensors files of a checkpoint directory, from `model.safetensors.index.json` when present."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(f"{index}: every 'weight_map' value must be a file name")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names files that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {model_dir}")
    return files


def shard_range(size: int, rank: int, world_size: int, what: str) -> slice:
    """The slice of an even split of `size` rows that `rank` owns; refuses sizes that do not divide."""
    if size % world_size != 0:
        raise CheckpointError(f"{what}: size {size} is not divisible by the world size {world_size}")
    block = size // world_size
    return slice(rank * block, (rank + 1) * block)


class Weights:
    """Reads tensors by name from one or many safetensors files, cast to `dtype`, on `device`.

    `process_group` is anything with `rank()` and `size()`; `aliases` maps a name to other names the
    same tensor may have in some checkpoints (e.g. tied embeddings); `quantization` (an Fp8Checkpoint of
    lorax_server/utils/quantization.py, or None) says how FP8 weights are scaled: they are read as
    float32 weight * scale, then cast to `dtype`. With `fp8_compute` set (by `--quantize fp8`), the layers
    that compute in FP8 read their weights through `lorax_server.layers.fp8` instead (`read_stored`).

    Every stored tensor a read touches (data or a scale) is recorded in `used`. On the meta device no data
    is read at all: reads return empty tensors of the right shape, so building a model over such weights
    checks every name and shape of a checkpoint without loading it.
    """

    def __init__(self, filenames: Iterable, device, dtype: torch.dtype, process_group,
                 aliases: Optional[Dict[str, Sequence[str]]] = None, quantization=None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.process_group = process_group
        self.aliases = dict(aliases or {})
        self.quantization = quantization
        self.fp8_compute = False
        self.views: Dict[str, Tuple[str, tuple]] = {}
        self.used: Set[str] = set()
        self.on_first_read: Optional[Callable[[str, Path], None]] = None  # e.g. a progress bar
        self._handles = {}
        self.routing: Dict[str, Path] = {}
        for filename in filenames:
            filename = Path(filename)
            with open_safetensors(filename) as f:
                for name in f.keys():
                    if name in self.routing:
                        raise CheckpointError(f"tensor {name} is stored twice: {self.routing[name]} and {filename}")
                    self.routing[name] = filename

    # -- lookup -------------------------------------------------------------------------------------

    def _resolve(self, name: str) -> Optional[str]:
        for candidate in (name, *self.aliases.get(name, ())):
            if candidate in self.routing:
                return candidate
        return None

    def has(self, name: str) -> bool:
        return name in self.views or self._resolve(name) is not None

    def add_view(self, name: str, stored: str, index: tuple) -> None:
        """Reads of `name` read `stored[index]` (ints and step-1 slices): a tensor a checkpoint keeps inside a
        larger one (e.g. one expert of a fused [E, 2F, H] tensor), under the name the model loads."""
        self.views[name] = (stored, index)

    def _locate(self, name: str, index: tuple = ()) -> Tuple[str, tuple]:
        """The stored tensor behind `name`, and `index` into `name` as an index into that tensor."""
        if name in self.views:
            stored, outer = self.views[name]
            return stored, compose_index(self.get_shape(stored), outer, index)
        resolved = self._resolve(name)
        if resolved is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        return resolved, index

    def _handle(self, name: str):
        resolved = self._resolve(name)
        if resolved is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        filename = self.routing[resolved]
        if filename not in self._handles:
            self._handles[filename] = open_safetensors(filename)
        return self._handles[filename], resolved

    def get_shape(self, name: str) -> List[int]:
        if name in self.views:
            stored, index = self.views[name]
            return list(torch.empty(self.get_shape(stored), device="meta")[index].shape)
        handle, resolved = self._handle(name)
        return list(handle.get_slice(resolved).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The dtype as the file stores it, in safetensors' spelling ("BF16", "F8_E4M3", "I8", ...)."""
        handle, resolved = self._handle(name)
        return handle.get_slice(resolved).get_dtype()

    def get_slice(self, name: str):
        handle, resolved = self._handle(name)
        return handle.get_slice(resolved)

    def unused(self) -> List[str]:
        """Stored tensors no read has touched (after a model was built over these weights)."""
        return sorted(set(self.routing) - self.used)

    def _check_shape(self, name: str, expected: Optional[Sequence[int]]) -> List[int]:
        found = self.get_shape(name)
        if expected is not None and list(expected) != found:
            raise CheckpointError(f"tensor {name}: expected shape {list(expected)}, found {found}")
        return found

    # -- data ---------------------------------------------------------------------------------------

    def _read(self, name: str, index: tuple = ()) -> torch.Tensor:
        """`name[index]` as `dtype` numbers on `device`: the one place data is read."""
        stored, index = self._locate(name, index)
        self._mark_used(stored)
        if self.device.type == "meta":
            return torch.empty(self.get_shape(stored), dtype=self.dtype, device="meta")[index]
        tensor = self.get_slice(stored)[index]
        if tensor.dtype == torch.float8_e4m3fn:  # scaled where it will live: a GPU does it in no time, a CPU slowly
            tensor = self._dequantize(stored, tensor.to(self.device), index)
        return self._finish(tensor)

    def read_stored(self, name: str, index: tuple = ()) -> Tuple[torch.Tensor, str, tuple]:
        """`name[index]` as the file stores it (no cast, no scaling) on `device`, with the stored tensor's name
        and the index into it (not `name` and `index` when `name` is a view): FP8 weights and their scales."""
        stored, index = self._locate(name, index)
        self._mark_used(stored)
        if self.device.type == "meta":
            dtype = FP8_DTYPES.get(self.stored_dtype(stored)) if stored in self.routing else None
            dtype = dtype or self.dtype
            return torch.empty(self.get_shape(stored), dtype=dtype, device="meta")[index], stored, index
        return self.get_slice(stored)[index].to(self.device), stored, index

    def _dequantize(self, stored: str, tensor: torch.Tensor, index: tuple) -> torch.Tensor:
        if self.quantization is None:
            raise CheckpointError(f"tensor {stored} is FP8, but config.json has no quantization_config saying how "
                                  f"it is scaled")
        scale = self.quantization.scale_name(stored)
        self._mark_used(scale)
        rows = index[0] if index else slice(None)
        return self.quantization.dequantize(tensor, self.get_slice(scale)[()].to(tensor.device), rows, scale)

    def _mark_used(self, stored: str) -> None:
        if stored in self.used:
            return
        self.used.add(stored)
        if self.on_first_read is not None and self.device.type != "meta":
            self.on_first_read(stored, self.routing.get(stored))

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.to(self.device)

    # -- reads --------------------------------------------------------------------------------------

    def get_tensor(self, name: str, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The whole tensor (replicated on every rank); `shape` is the full shape it must have."""
        self._check_shape(name, shape)
        return self._read(name)

    def get_sharded(self, name: str, dim: int, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """This rank's even slice of `name` along `dim`; `shape` is the full (unsharded) shape."""
        return self._read(name, self.shard_index(name, dim, shape))

    def shard_index(self, name: str, dim: Optional[int], shape: Optional[Sequence[int]] = None) -> tuple:
        """The index of this rank's even slice of `name` along `dim` (what `get_sharded` reads); with `dim`
        None, of the whole tensor. `shape` is the full shape `name` must have."""
        full = self._check_shape(name, shape)
        if dim is None:
            return ()
        group = self.process_group
        rows = shard_range(full[dim], group.rank(), group.size(), f"tensor {name} dim {dim}")
        index = [slice(None)] * len(full)
        index[dim] = rows
        return tuple(index)

    def get_rows(self, name: str, rows: slice, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Rows `rows` of `name` (an uneven split, e.g. of a vocabulary); `shape` is the full shape."""
        self._check_shape(name, shape)
        return self._read(name, (rows,))

    def get_multi_weights_col(self, prefixes: Sequence[str], quantize: Optional[str] = None, dim: int = 0,
                              shapes: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """Column-parallel weights of several layers fused along `dim` (e.g. q, k, v into qkv). Each is read
        (and, if FP8, dequantized with its own scale) before they are joined."""
        refuse_quantization(quantize)
        shapes = shapes or [None] * len(prefixes)
        return torch.cat([self.get_sharded(f"{p}.weight", dim, s) for p, s in zip(prefixes, shapes)], dim=dim)

    def get_multi_weights_row(self, prefix: str, quantize: Optional[str] = None,
                              shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """A row-parallel weight: this rank's slice of the input dimension."""
        refuse_quantization(quantize)
        return self.get_sharded(f"{prefix}.weight", 1, shape)


def compose_index(shape: Sequence[int], outer: tuple, inner: tuple) -> tuple:
    """One index into a tensor of `shape` that picks what `[outer]` then `[inner]` pick (ints and step-1
    slices only, as safetensors reads them)."""
    picks = [range(size)[outer[d]] if d < len(outer) else range(size) for d, size in enumerate(shape)]
    kept = [d for d, pick in enumerate(picks) if isinstance(pick, range)]  # the dims `inner` indexes
    for d, item in zip(kept, inner):
        picks[d] = picks[d][item]
    return tuple(p if isinstance(p, int) else slice(p.start, p.stop) for p in picks)


def refuse_quantization(quantize: Optional[str]) -> None:
    if quantize is not None:
        raise CheckpointError(f"quantization '{quantize}' is not supported by this server")


class MetaWeights(Weights):
    """Weights with no checkpoint: every read returns an empty tensor of the expected shape on the meta
    device. Building a model over it checks a config's shapes (and sizes memory) without any data."""

    def __init__(self, process_group, dtype: torch.dtype = torch.bfloat16):
        super().__init__([], "meta", dtype, process_group)
        self.expected: Dict[str, List[int]] = {}

    def _check_shape(self, name: str, expected: Optional[Sequence[int]]) -> List[int]:
        if expected is None:
            raise CheckpointError(f"tensor {name}: MetaWeights needs the expected shape")
        self.expected[name] = list(expected)
        return list(expected)

    def _resolve(self, name: str) -> Optional[str]:
        return name if name in self.expected else None

    def get_shape(self, name: str) -> List[int]:
        return self.expected[name]

    def get_slice(self, name: str) -> torch.Tensor:
        return torch.empty(self.expected[name], dtype=self.dtype, device="meta")
