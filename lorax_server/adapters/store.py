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
from lorax_server.adapters.weights import BASE_MODEL_ADAPTER_INDEX, AdapterError, AdapterWeights


class AdapterStore:
    def __init__(self, model_config, process_group, dtype: torch.dtype, device):
        self.loader = PeftLoraLoader(model_config, process_group, dtype, device)
        self.loaded: Dict[int, AdapterWeights] = {}
        self.lock = threading.Lock()

    def load(self, index: int, adapter_dir, adapter_id: Optional[str] = None) -> AdapterWeights:
        if index == BASE_MODEL_ADAPTER_INDEX:
            raise AdapterError(f"adapter index {BASE_MODEL_ADAPTER_INDEX} is the base model; choose another")
        with self.lock:
            if index in self.loaded:
                raise AdapterError(f"adapter index {index} already holds {self.loaded[index].adapter_id}; "
                                   "offload it first")
        weights = self.loader.load(adapter_dir, adapter_id)
        with self.lock:
            self.loaded[index] = weights
        return weights

    def offload(self, index: int) -> AdapterWeights:
        with self.lock:
            if index not in self.loaded:
                raise AdapterError(f"adapter index {index} is not loaded")
            return self.loaded.pop(index)

    def memory_bytes(self, index: int) -> int:
        return self.loaded[index].memory_bytes

    def check_loaded(self, indices) -> None:
        missing = sorted(set(indices) - set(self.loaded) - {BASE_MODEL_ADAPTER_INDEX})
        if missing:
            raise AdapterError(f"adapter index {missing[0]} is not loaded")

    def batch_data(self, token_adapters: torch.Tensor) -> Optional[AdapterBatchData]:
        """The AdapterBatchData for these per-token indices; None when every token uses the base model."""
        indices = set(token_adapters.unique().tolist()) - {BASE_MODEL_ADAPTER_INDEX}
        if not indices:
            return None
        with self.lock:
            self.check_loaded(indices)
            return AdapterBatchData(token_adapters, {i: self.loaded[i] for i in indices})
