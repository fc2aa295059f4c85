"""LoRA on the GPU: the Triton kernels over stacked adapters against the per-adapter torch loop, and a
decode step with adapters captured in a CUDA graph."""

import pytest
import torch

from tests.gpu.conftest import relative_error, skip_without_gpu

skip_without_gpu()

from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for, write_per_expert_adapter  # noqa: E402
from tests.tiny_mixtral import load_ours, paged_logits, save_tiny_mixtral  # noqa: E402

pytestmark = pytest.mark.gpu
SEQUENCES = [list(range(2, 17)), list(range(40, 50)), list(range(60, 80)), list(range(10, 22))]


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf = save_tiny_mixtral(root / "base", hidden_size=128, intermediate_size=256, head_dim=32)
    make_peft_adapter(hf, root / "a1", seed=1, r=2, target_modules=ATTENTION_AND_HEAD)
    make_peft_adapter(hf, root / "a2", seed=2, r=16, target_modules=["w1", "w2", "w3", "gate", "q_proj"])
    write_per_expert_adapter(hf, root / "a3", seed=3, r=5)
    return load_ours(root / "base", dtype=torch.bfloat16, device="cuda"), root


def logits_with(model, root, kernels: bool, dtype=torch.bfloat16):
    store = store_for(model, dtype=dtype, device="cuda")
    store.use_kernels = kernels
    for i in (1, 2, 3):
        store.load(i, root / f"a{i}")
    assert (store.stacks is not None) == kernels
    return paged_logits(model, SEQUENCES, [9, 4, 14, 6], adapters=store, adapter_indices=[0, 1, 2, 3],
                        device="cuda", dtype=dtype)


def test_kernels_are_as_accurate_as_the_torch_loop(model_and_adapters):
    """Both bf16 paths against the fp32 model with the torch loop (bf16 rounding differs between them:
    the kernels accumulate the shrink in fp32, the loop rounds it to bf16)."""
    model, root = model_and_adapters
    reference = logits_with(load_ours(root / "base", dtype=torch.float32, device="cuda"), root, False, torch.float32)
    for kernel, loop, want in zip(logits_with(model, root, True), logits_with(model, root, False), reference):
        kernel_error, loop_error = relative_error(kernel, want), relative_error(loop, want)
        assert kernel_error < 3e-2 and kernel_error <= 1.5 * loop_error + 1e-3


def test_decode_with_adapters_is_capturable(model_and_adapters):
    from lorax_server.engine.cache import PagedKVCache, PagedSequence
    from lorax_server.engine.runner import pack

    model, root = model_and_adapters
    store = store_for(model, dtype=torch.bfloat16, device="cuda")
    for i in (1, 2, 3):
        store.load(i, root / f"a{i}")
    cache = PagedKVCache(2, 32, 16, model.num_kv_heads, model.head_dim, torch.bfloat16, "cuda")
    seqs = [PagedSequence(list(range(30)), adapter, cached=29) for adapter in (0, 1, 2, 3)]
    batch = pack(seqs, [1] * 4, cache, False, "cuda")
    adapter_data = store.batch_data(batch.token_adapters)
    inputs = batch.model_inputs(cache.layers, adapter_data)
    eager, _ = model(**inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = model(**inputs)
    graph.replay()
    assert relative_error(captured, eager) < 1e-3
