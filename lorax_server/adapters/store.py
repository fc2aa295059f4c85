"""The adapters a running model serves, by index: load, offload, and the data of one batch.

Loading validates and shards an adapter completely before it becomes visible, and publishing it is
one dictionary assignment under a lock, so a refused adapter leaves nothing behind and requests for
other adapters are never disturbed.
"""

import threading
from typing import Dict, Optional

import torch

from lorax_server.adapters.batch import AdapterBatchData
from lorax_server.adapters.peft import PeftLoraLoader
from lorax_server.adapters.stacked import LoraStacks, build_stacks
from lorax_server.adapters.weights import BASE_MODEL_ADAPTER_INDEX, AdapterError, AdapterWeights
from lorax_server.utils.backends import Backend, choose, needs_cuda_and_triton

# The implementation is a flag: stacked weights + Triton kernels (True) or the per-adapter loop (False).
LORA_BACKENDS = (Backend("triton", True, needs_cuda_and_triton), Backend("torch", False))


# The largest LoRA rank the Triton kernels take (a transformers-4 expert adapter of rank r has rank 2r on
# the fused gate/up). Their tiles grow with the rank; the GPU tests cover ranks up to 32.
MAX_KERNEL_RANK = 256


def check_kernel_rank(weights: AdapterWeights) -> None:
    ranks = [w.a.shape[1] for w in weights.linear.values()] + [w.a.shape[1] for w in weights.experts.values()]
    if ranks and max(ranks) > MAX_KERNEL_RANK:
        raise AdapterError(f"adapter {weights.adapter_id} has LoRA rank {max(ranks)}; the GPU LoRA kernels take at "
                           f"most {MAX_KERNEL_RANK} (LORAX_LORA_BACKEND=torch serves any rank, more slowly)")


class AdapterStore:
    def __init__(self, model_config, process_group, dtype: torch.dtype, device, base_model=None):
        """`base_model`: the served FlashMixtralForCausalLM, to compare with the lm_head / embed_tokens weight an
        adapter saves (PEFT loads such a weight into the model; here it must equal the model's)."""
        self.loader = PeftLoraLoader(model_config, process_group, dtype, device, base_model)
        self.loaded: Dict[int, AdapterWeights] = {}
        self.lock = threading.Lock()
        self.device = torch.device(device)
        self.num_experts = model_config.num_local_experts
        # The Triton LoRA kernels need every adapter stacked per target: built only when they are chosen.
        self.use_kernels = choose("lora", LORA_BACKENDS, self.device)
        self.stacks: Optional[LoraStacks] = None

    def load(self, index: int, adapter_dir, adapter_id: Optional[str] = None) -> AdapterWeights:
        if index == BASE_MODEL_ADAPTER_INDEX:
            raise AdapterError(f"adapter index {BASE_MODEL_ADAPTER_INDEX} is the base model; choose another")
        with self.lock:
            if index in self.loaded:
                raise AdapterError(f"adapter index {index} already holds {self.loaded[index].adapter_id}; "
                                   "offload it first")
        weights = self.loader.load(adapter_dir, adapter_id)
        if self.use_kernels:
            check_kernel_rank(weights)
        with self.lock:
            self.publish({**self.loaded, index: weights})
        return weights

    def load_merged(self, index: int, adapter_dirs, adapter_id: str, strategy="linear", weights=(),
                    density: float = 1.0, majority_sign="total", seed: int = 0) -> AdapterWeights:
        """Merges the PEFT adapters in `adapter_dirs` (a sequence of paths) into one adapter served at `index`
        (see adapters/merges.py): `weights` a sequence of floats, one per adapter (empty: all 1).

        As in LoRAX, a single adapter is loaded as it is (strategy, weights and density are not applied);
        `strategy` and `majority_sign` take a name or the wire enum number. Nothing is published on error.
        """
        from lorax_server.adapters.merges import BASE_MODEL_ADAPTER_ID, merge_adapters

        adapter_dirs = list(adapter_dirs)
        if index == BASE_MODEL_ADAPTER_INDEX:
            raise AdapterError(f"adapter index {BASE_MODEL_ADAPTER_INDEX} is the base model; choose another")
        if len(adapter_dirs) == 1 and str(adapter_dirs[0]) != BASE_MODEL_ADAPTER_ID:
            return self.load(index, adapter_dirs[0], adapter_id)
        with self.lock:
            if index in self.loaded:
                raise AdapterError(f"adapter index {index} already holds {self.loaded[index].adapter_id}; "
                                   "offload it first")
        merged = merge_adapters(self.loader, adapter_dirs, adapter_id, strategy, weights, density, majority_sign, seed)
        if self.use_kernels:
            check_kernel_rank(merged)
        with self.lock:
            self.publish({**self.loaded, index: merged})
        return merged

    def offload(self, index: int) -> AdapterWeights:
        with self.lock:
            if index not in self.loaded:
                raise AdapterError(f"adapter index {index} is not loaded")
            removed = self.loaded[index]
            self.publish({i: w for i, w in self.loaded.items() if i != index})
            return removed

    def publish(self, loaded: Dict[int, AdapterWeights]) -> None:
        """Makes `loaded` the served set: the stacks are built first, then both are swapped in together."""
        stacks = build_stacks(loaded, self.num_experts, self.device) if self.use_kernels and loaded else None
        self.loaded, self.stacks = loaded, stacks

    def memory_bytes(self, index: int) -> int:
        """Device memory the adapter takes; with the kernels its weights are also held in the stacks."""
        return self.loaded[index].memory_bytes * (2 if self.stacks is not None else 1)

    def check_loaded(self, indices) -> None:
        missing = sorted(set(indices) - set(self.loaded) - {BASE_MODEL_ADAPTER_INDEX})
        if missing:
            raise AdapterError(f"adapter index {missing[0]} is not loaded")

    def batch_data(self, token_adapters: torch.Tensor, present=None) -> Optional[AdapterBatchData]:
        """The AdapterBatchData for these per-token indices; None when every token uses the base model.
        `present`, the set of indices in the batch when the caller knows it, saves a device round trip."""
        present = set(token_adapters.unique().tolist()) if present is None else set(present)
        indices = present - {BASE_MODEL_ADAPTER_INDEX}
        if not indices:
            return None
        with self.lock:
            self.check_loaded(indices)
            return AdapterBatchData.for_tokens(token_adapters, {i: self.loaded[i] for i in indices}, self.stacks)
