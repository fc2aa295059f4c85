"""The FP8 KV cache's Triton kernels (KV write, paged decode, varlen prefill's cache phase, split-KV included)
against the torch reference over the same e4m3 cache with the same scales."""

import pytest
import torch

from tests.gpu.conftest import relative_error, skip_without_gpu

skip_without_gpu()

from lorax_server.kernels.paged_attention import paged_decode_attention  # noqa: E402
from lorax_server.kernels.paged_attention import write_kv as triton_write_kv  # noqa: E402
from lorax_server.kernels.prefill_attention import varlen_prefill_attention  # noqa: E402
from lorax_server.layers.attention import cuda as cuda_attention  # noqa: E402
from lorax_server.layers.attention import reference  # noqa: E402
from lorax_server.utils.attention.common import Seqlen  # noqa: E402

DEV = "cuda"
FP8 = torch.float8_e4m3fn
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = (torch.bfloat16, torch.float32)
SCALES = [(1.0, 1.0), (0.05, 0.02), (2.0, 0.5)]
# Reference and kernel read the same e4m3 entries; they differ by the compute dtype's rounding only.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEV)


class Fp8Problem:
    """Sequences with `cached` tokens in a shuffled-block FP8 cache (written by the reference) and `new` packed
    tokens (also written to the cache, for the kernels that read them from there)."""

    def __init__(self, cached, new, block_size, dtype, k_scale, v_scale, seed=0):
        g = torch.Generator().manual_seed(seed)
        total = [c + n for c, n in zip(cached, new)]
        blocks_per_seq = [-(-t // block_size) for t in total]
        num_blocks = sum(blocks_per_seq) + 3
        order = torch.randperm(num_blocks, generator=g).tolist()
        width = max(blocks_per_seq)
        self.key_cache = torch.zeros(num_blocks, block_size, KV_HEADS, HEAD_DIM, dtype=FP8, device=DEV)
        self.value_cache = torch.zeros_like(self.key_cache)
        tables, new_k, new_v = [], [], []
        for t, c in zip(total, cached):
            blocks = [order.pop() for _ in range(-(-t // block_size))]
            tables.append(blocks + [0] * (width - len(blocks)))
            k = torch.randn(t, KV_HEADS, HEAD_DIM, generator=g).to(DEV, dtype)
            v = torch.randn(t, KV_HEADS, HEAD_DIM, generator=g).to(DEV, dtype)
            slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(t)], device=DEV)
            reference.write_kv(k, v, self.key_cache, self.value_cache, slots, k_scale=k_scale, v_scale=v_scale)
            new_k.append(k[c:])
            new_v.append(v[c:])
        self.tables = torch.tensor(tables, dtype=torch.int32, device=DEV)
        self.q = torch.randn(sum(new), HEADS, HEAD_DIM, generator=g).to(DEV, dtype)
        self.k, self.v = torch.cat(new_k), torch.cat(new_v)
        self.seqlen = Seqlen(torch.tensor(new, device=DEV), torch.tensor(cached, device=DEV), cu(new))
        self.cached, self.new, self.scales = cached, new, dict(k_scale=k_scale, v_scale=v_scale)

    def reference(self, window=None, packed=True):
        extra = dict(key=self.k, value=self.v) if packed else {}
        return reference.paged_attention(self.q.float(), self.key_cache, self.value_cache, self.tables, self.seqlen,
                                         HEAD_DIM**-0.5, window, **extra, **self.scales)


@pytest.mark.parametrize("k_scale, v_scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_kernel_stores_the_references_bytes(dtype, k_scale, v_scale):
    g = torch.Generator().manual_seed(1)
    T = 37
    key = (4 * torch.randn(T, KV_HEADS, HEAD_DIM, generator=g)).to(DEV, dtype)
    value = torch.randn(T, KV_HEADS, HEAD_DIM, generator=g).to(DEV, dtype)
    key[0, 0, :2] = torch.tensor([1e4, -1e4])  # saturates at +-448, never NaN
    slots = torch.randperm(64, generator=g)[:T].to(DEV)
    slots[3] = -1
    caches = [torch.zeros(4, 16, KV_HEADS, HEAD_DIM, dtype=FP8, device=DEV) for _ in range(4)]
    triton_write_kv(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    reference.write_kv(key, value, caches[2], caches[3], slots, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    assert not torch.isnan(caches[0].float()).any()


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("k_scale, v_scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_over_an_fp8_cache(dtype, k_scale, v_scale, window):
    p = Fp8Problem([90, 0, 300, 17], [1, 1, 1, 1], 16, dtype, k_scale, v_scale)
    lengths = p.seqlen.total_lengths.to(torch.int32)
    got = paged_decode_attention(p.q, p.key_cache, p.value_cache, p.tables, lengths, int(lengths.max()),
                                 HEAD_DIM**-0.5, window, **p.scales)
    assert relative_error(got, p.reference(window, packed=False)) < TOLERANCE[dtype]
    # Through the attention ops, as the model calls them.
    ops = cuda_attention.paged_attention(p.q, p.key_cache, p.value_cache, p.tables, p.seqlen, HEAD_DIM**-0.5,
                                         window, **p.scales)
    assert torch.equal(ops, got)


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("k_scale, v_scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_prefill_over_an_fp8_cache(dtype, k_scale, v_scale, block_size, window):
    """New tokens (packed, unscaled) on cached prefixes (FP8, scaled), through the ops the model calls."""
    p = Fp8Problem([70, 0, 150, 33], [5, 17, 40, 1], block_size, dtype, k_scale, v_scale)
    got = cuda_attention.paged_attention(p.q, p.key_cache, p.value_cache, p.tables, p.seqlen, HEAD_DIM**-0.5,
                                         window, key=p.k, value=p.v, **p.scales)
    assert relative_error(got, p.reference(window)) < TOLERANCE[dtype]


@pytest.mark.parametrize("k_scale, v_scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_new_tokens_read_from_the_fp8_cache(dtype, k_scale, v_scale):
    """Without packed k/v the new tokens' keys come from the cache too (scaled like the prefix)."""
    p = Fp8Problem([40, 0, 9], [8, 20, 3], 16, dtype, k_scale, v_scale)
    got = varlen_prefill_attention(p.q, None, None, p.seqlen.cu_seqlen_q, max(p.new), HEAD_DIM**-0.5,
                                   cache_lengths=p.seqlen.cache_lengths, key_cache=p.key_cache,
                                   value_cache=p.value_cache, block_tables=p.tables,
                                   max_k=max(c + n for c, n in zip(p.cached, p.new)), **p.scales)
    assert relative_error(got, p.reference(packed=False)) < TOLERANCE[dtype]


@pytest.mark.parametrize("window", [None, 150])
@pytest.mark.parametrize("k_scale, v_scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_prefix_prefill_over_an_fp8_cache(dtype, k_scale, v_scale, window):
    """A few new tokens on long prefixes, the prefix split over 3 programs per row tile and merged."""
    p = Fp8Problem([400, 7, 260], [3, 2, 9], 16, dtype, k_scale, v_scale)
    got = varlen_prefill_attention(p.q, p.k, p.v, p.seqlen.cu_seqlen_q, max(p.new), HEAD_DIM**-0.5, window,
                                   cache_lengths=p.seqlen.cache_lengths, key_cache=p.key_cache,
                                   value_cache=p.value_cache, block_tables=p.tables,
                                   max_k=max(c + n for c, n in zip(p.cached, p.new)), max_cached=max(p.cached),
                                   splits=3, **p.scales)
    assert relative_error(got, p.reference(window)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_engines_self_check_passes_the_triton_ops(dtype):
    from lorax_server.layers.attention import check_fp8_kv_ops, load_cuda_ops

    check_fp8_kv_ops(load_cuda_ops(), torch.device(DEV), HEADS, KV_HEADS, HEAD_DIM, dtype)


def test_the_tiny_model_serves_with_an_fp8_cache():
    """The engine on the GPU (Triton ops, CUDA graphs for decode) with kv_cache_dtype="fp8": twice the blocks of
    the bfloat16 cache, the self-check passed at construction, and greedy output close to the bfloat16 cache's
    (the first token comes from a prefill that reads no cache entry, so it is the same)."""
    from lorax_server.cli import DEFAULT_MODEL_DIR
    from lorax_server.models import get_model

    texts = ["The for statement", "def fibonacci(n):", "1, 2, 3, 4,", "The while statement"]
    fp8 = get_model(str(DEFAULT_MODEL_DIR), kv_cache_bytes=8 << 20, kv_cache_dtype="fp8")
    bf16 = get_model(str(DEFAULT_MODEL_DIR), kv_cache_bytes=8 << 20)
    assert fp8.cache.layers[0][0].dtype == FP8 and fp8.cache.num_blocks == 2 * bf16.cache.num_blocks
    got, want = fp8.generate(texts, 16), bf16.generate(texts, 16)
    agree = [next((n for n, (a, b) in enumerate(zip(x.generated_ids, y.generated_ids)) if a != b), 16)
             for x, y in zip(got, want)]
    assert all(n >= 1 for n in agree) and sum(agree) >= 0.4 * 16 * len(texts), agree
