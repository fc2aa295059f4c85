"""The FP8 KV cache in the reference ops (the oracle of the Triton kernels): e4m3 entries, a K and a V scale.

Bounds: e4m3 keeps 3 mantissa bits, so a normal value is stored within a relative 2^-4 of x / scale (and a
subnormal one, |x / scale| < 2^-6, within 2^-10 absolute). Against the attention over the exact float K/V this
perturbs each value by at most 6.25% of itself and each score by at most 6.25% of sum |q_i k_i| * scale, so for
unit-normal data at head dim 8 the output moves by a few hundredths (at most 0.16 over 120 random cases): the
tests allow 0.25 absolute against the float cache, and compare exactly (to fp32 rounding) against a float cache
that holds the dequantized entries.
"""

import pytest
import torch

from lorax_server.layers.attention import reference
from lorax_server.utils.attention.common import Seqlen

H, KVH, D, BS = 4, 2, 8, 4
FP8 = torch.float8_e4m3fn


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


def build(dtype, k_scale, v_scale, cached, new, seed=0):
    """Caches of `dtype` holding each sequence's cached + new tokens (written through write_kv), the block
    tables, q, and the packed new tokens' k/v."""
    g = torch.Generator().manual_seed(seed)
    total = [c + n for c, n in zip(cached, new)]
    num_blocks = 40
    key_cache = torch.zeros(num_blocks, BS, KVH, D, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, new_k, new_v = [], [], []
    for t, c in zip(total, cached):
        k, v = torch.randn(t, KVH, D, generator=g), torch.randn(t, KVH, D, generator=g)
        blocks = [free.pop() for _ in range(-(-t // BS))]
        tables.append(blocks + [0] * (12 - len(blocks)))
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(t)])
        reference.write_kv(k, v, key_cache, value_cache, slots, k_scale=k_scale, v_scale=v_scale)
        new_k.append(k[c:])
        new_v.append(v[c:])
    q = torch.randn(sum(new), H, D, generator=g)
    seqlen = Seqlen(torch.tensor(new), torch.tensor(cached), cu(new))
    tables = torch.tensor(tables, dtype=torch.int32)
    return key_cache, value_cache, tables, q, seqlen, torch.cat(new_k), torch.cat(new_v)


def test_write_stores_the_value_over_its_scale_in_e4m3_and_saturates():
    key_cache = torch.zeros(2, BS, KVH, D, dtype=FP8)
    value_cache = torch.zeros_like(key_cache)
    k = torch.randn(3, KVH, D)
    k[0, 0, 0], k[0, 0, 1] = 1e4, -1e4  # out of e4m3's range at scale 2: saturated, not NaN
    v = torch.randn(3, KVH, D)
    reference.write_kv(k, v, key_cache, value_cache, torch.tensor([5, -1, 0]), k_scale=2.0, v_scale=0.5)
    flat_k, flat_v = key_cache.view(-1, KVH, D), value_cache.view(-1, KVH, D)
    assert torch.equal(flat_k[5].float(), (k[0] / 2.0).clamp(-448, 448).to(FP8).float())
    assert flat_k[5, 0, 0].item() == 448.0 and flat_k[5, 0, 1].item() == -448.0
    assert torch.equal(flat_v[0].float(), (v[2] / 0.5).to(FP8).float())
    assert flat_k[[i for i in range(8) if i not in (0, 5)]].float().abs().sum() == 0  # slot -1 skipped


def test_a_float_cache_ignores_the_scales():
    """The scales apply to an FP8 cache only: a float cache's write and read are the ones without them."""
    args = dict(cached=[5, 0, 9], new=[2, 3, 1])
    plain = build(torch.float32, 1.0, 1.0, **args)
    scaled = build(torch.float32, 4.0, 0.25, **args)
    assert torch.equal(plain[0], scaled[0]) and torch.equal(plain[1], scaled[1])
    got = reference.paged_attention(scaled[3], scaled[0], scaled[1], scaled[2], scaled[4], D**-0.5, None,
                                    k_scale=4.0, v_scale=0.25)
    want = reference.paged_attention(plain[3], plain[0], plain[1], plain[2], plain[4], D**-0.5, None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.05, 0.02), (2.0, 3.0)])
@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_over_an_fp8_cache(scales, packed, window):
    """Decode and prefill on a cached prefix over an FP8 cache: exactly the attention over the dequantized
    entries (entry * scale), and within the e4m3 bound of the attention over the float cache. Packed new
    tokens (`key`/`value`) are used unscaled and unquantized."""
    k_scale, v_scale = scales
    args = dict(cached=[5, 0, 9, 13], new=[2, 3, 1, 1])
    kc, vc, tables, q, seqlen, new_k, new_v = build(FP8, k_scale, v_scale, **args)
    fkc, fvc, _, _, _, _, _ = build(torch.float32, 1.0, 1.0, **args)
    extra = dict(key=new_k, value=new_v) if packed else {}
    got = reference.paged_attention(q, kc, vc, tables, seqlen, D**-0.5, window, k_scale=k_scale, v_scale=v_scale,
                                    **extra)
    dequantized = reference.paged_attention(q, kc.float() * k_scale, vc.float() * v_scale, tables, seqlen, D**-0.5,
                                            window, **extra)
    torch.testing.assert_close(got, dequantized, rtol=1e-6, atol=1e-6)
    exact = reference.paged_attention(q, fkc, fvc, tables, seqlen, D**-0.5, window, **extra)
    error = (got - exact).abs().max().item()
    assert error < 0.25, error
    assert error > 0  # the cache really is quantized


def test_fp8_entries_are_read_in_the_query_dtype():
    kc, vc, tables, q, seqlen, _, _ = build(FP8, 0.5, 0.5, cached=[4, 7], new=[1, 1])
    got = reference.paged_attention(q.bfloat16(), kc, vc, tables, seqlen, D**-0.5, None, k_scale=0.5, v_scale=0.5)
    want = reference.paged_attention(q, kc, vc, tables, seqlen, D**-0.5, None, k_scale=0.5, v_scale=0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.05)


def test_the_engines_self_check_passes_correct_ops_and_names_a_wrong_one():
    """check_fp8_kv_ops (run at engine construction on CUDA with an FP8 cache) against ops that get the FP8
    cache right, then ops that forget a scale or the quantization."""
    from lorax_server.layers.attention import TORCH_OPS, AttentionOps, check_fp8_kv_ops

    cpu = torch.device("cpu")
    right = AttentionOps(lambda *a, **k: reference.write_kv(*a, **k), reference.prefill_attention,
                         lambda *a, **k: reference.paged_attention(*a, **k))
    check_fp8_kv_ops(right, cpu, H, KVH, 16, torch.float32)
    check_fp8_kv_ops(TORCH_OPS, cpu, H, KVH, 16, torch.float32)

    def unscaled_write(*args, k_scale=1.0, v_scale=1.0):
        reference.write_kv(*args)

    def unscaled_paged(*args, k_scale=1.0, v_scale=1.0, **kwargs):
        return reference.paged_attention(*args, k_scale=k_scale, v_scale=1.0, **kwargs)

    def prefill_wrong(q, *args, k_scale=1.0, v_scale=1.0, **kwargs):
        if "key" in kwargs:  # the check's prefix prefill, not its decode step
            k_scale = 1.0
        return reference.paged_attention(q, *args, k_scale=k_scale, v_scale=v_scale, **kwargs)

    with pytest.raises(RuntimeError, match="KV-write kernel stores other e4m3 values"):
        check_fp8_kv_ops(AttentionOps(unscaled_write, right.prefill, right.paged), cpu, H, KVH, 16, torch.float32)
    with pytest.raises(RuntimeError, match="paged decode attention kernel disagrees"):
        check_fp8_kv_ops(AttentionOps(right.write_kv, right.prefill, unscaled_paged), cpu, H, KVH, 16,
                         torch.float32)
    with pytest.raises(RuntimeError, match="prefix prefill attention kernel disagrees.*serve without"):
        check_fp8_kv_ops(AttentionOps(right.write_kv, right.prefill, prefill_wrong), cpu, H, KVH, 16, torch.float32)
