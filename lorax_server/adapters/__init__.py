"""LoRA adapters: PEFT loading, per-rank weights, and the per-batch data the model's hook points apply."""

from lorax_server.adapters.batch import AdapterBatchData, ExpertLoraBatch
from lorax_server.adapters.weights import (
    BASE_MODEL_ADAPTER_INDEX,
    AdapterError,
    AdapterWeights,
    ExpertLoraWeights,
    LoraWeights,
)

__all__ = ["AdapterBatchData", "ExpertLoraBatch", "BASE_MODEL_ADAPTER_INDEX", "AdapterError", "AdapterWeights",
           "ExpertLoraWeights", "LoraWeights"]
