"""FP8 kernels against the dequantized torch path: the activation quantizer, the FP8 linear (torch._scaled_mm,
and the Triton weight-only kernel for small batches), the fused FP8 MoE kernels (W8A8 and W8A16), the FP8
grouped GEMM, and the tiny model served in FP8.

Each W8A8 result is compared with two oracles: the same arithmetic in float32 (activations quantized the same
way, weights dequantized; bounds of bf16 output rounding, 2e-2), and the float computation over the dequantized
weights with unquantized activations (what FP8 activations cost: bounds of e4m3 rounding, 8e-2).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.conftest import relative_error, skip_without_gpu

skip_without_gpu()

from lorax_server.kernels.fp8_linear import w8a16_linear  # noqa: E402
from lorax_server.kernels.fp8_quant import quantize_rows  # noqa: E402
from lorax_server.kernels.fused_moe import MOE_FP8_TILE_CONFIGS, fused_moe  # noqa: E402
from lorax_server.layers.fp8 import (  # noqa: E402
    W8A16_MAX_ROWS,
    Fp8Tensors,
    Fp8Weight,
    dequantize,
    fake_quantize_rows,
    fp8_unsupported,
    load_scaled_mm,
    quantize_rows_reference,
    quantize_weight,
)
from lorax_server.layers.moe import Routing, dispatch, moe_experts, route  # noqa: E402
from lorax_server.layers.moe.experts import linear_fp8_dequantized, load_scaled_grouped_mm  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
W8A8_BOUND = 2e-2  # against the same arithmetic in float32: bf16 outputs, fp32 accumulation order
FP8_COST_BOUND = 8e-2  # against unquantized activations: e4m3 keeps 3 mantissa bits (about 2-4% per value)


def needs_fp8():
    reason = fp8_unsupported(torch.device(DEV))
    if reason is not None:
        pytest.skip(reason)


# -- activations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M, K", [(1, 4096), (37, 1000), (300, 14336)])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_rows_matches_the_reference(M, K, static):
    wide = (torch.randn(M, 2 * K, device=DEV) * torch.logspace(-3, 2, M, device=DEV).unsqueeze(1)).bfloat16()
    x = wide[:, :K]  # rows 2K apart
    scale = torch.tensor(0.05, device=DEV) if static else None
    got, got_scale = quantize_rows(x, scale)
    want, want_scale = quantize_rows_reference(x, scale)
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-6, atol=0)
    # the kernel's division may round the last bit differently: a value then lands one e4m3 step away
    assert relative_error(got.float() * got_scale[:, None], want.float() * want_scale[:, None]) < 1e-3
    assert (got.float() != want.float()).float().mean() < 1e-3


def test_quantize_rows_skips_padding_blocks():
    x = torch.randn(64, 256, device=DEV).bfloat16()
    block_expert = torch.tensor([3, -1, 0, -1], device=DEV, dtype=torch.int32)  # blocks of 16 rows
    got, scale = quantize_rows(x, None, (block_expert, 16))
    want, want_scale = quantize_rows_reference(x)
    for block in (0, 2):
        rows = slice(16 * block, 16 * block + 16)
        torch.testing.assert_close(scale[rows], want_scale[rows], rtol=1e-6, atol=0)


# -- the FP8 linear ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_matches_the_dequantized_linear(M, static):
    """Up to W8A16_MAX_ROWS rows the weight-only Triton kernel (activations as they are), above it
    torch._scaled_mm on activations quantized per token (or with the static scale)."""
    needs_fp8()
    g = torch.Generator(device=DEV).manual_seed(M)
    w = quantize_weight(torch.randn(384, 512, device=DEV, generator=g) / 512**0.5)
    x = torch.randn(M, 512, device=DEV, generator=g).bfloat16()
    input_scale = torch.tensor(0.02, device=DEV) if static else None
    got = load_scaled_mm()(x, w.weight, w.weight_scale, input_scale)
    assert got.dtype == torch.bfloat16 and got.shape == (M, 384)
    dequantized = dequantize(w.weight, w.weight_scale).t()
    x_seen = x.float() if M <= W8A16_MAX_ROWS else fake_quantize_rows(x, input_scale)
    assert relative_error(got, x_seen @ dequantized) < W8A8_BOUND
    if not static:
        assert relative_error(got, x.float() @ dequantized) < FP8_COST_BOUND


@pytest.mark.parametrize("M, N, K", [(1, 4096, 4096), (16, 100, 1000), (100, 6144, 512)])
def test_w8a16_linear_kernel_at_uneven_shapes(M, N, K):
    w = quantize_weight(torch.randn(N, K, device=DEV) / K**0.5)
    x = torch.randn(M, K, device=DEV).bfloat16()
    got = w8a16_linear(x, w.weight, w.weight_scale)
    assert relative_error(got, x.float() @ dequantize(w.weight, w.weight_scale).t()) < W8A8_BOUND


# -- experts -----------------------------------------------------------------------------------------------


def fp8_moe_problem(T, E=8, H=512, Fn=768, K=2, skew=False, seed=0, static=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    w13 = quantize_weight(torch.randn(E, 2 * Fn, H, device=DEV, generator=g) / H**0.5)
    w2 = quantize_weight(torch.randn(E, H, Fn, device=DEV, generator=g) / Fn**0.5)
    if static:
        w13, w2 = w13._replace(input_scale=torch.tensor(0.03, device=DEV)), \
            w2._replace(input_scale=torch.tensor(0.01, device=DEV))
    logits = torch.randn(T, E, device=DEV, generator=g)
    if skew:
        logits[:, :2] += 8.0
    return x, Fp8Weight(w13), Fp8Weight(w2), route(logits, K)


def w8a8_reference(x, w13: Fp8Weight, w2: Fp8Weight, routing: Routing, quantize: bool = True):
    """The fused kernels' arithmetic in float32: x quantized per token, h (rounded to bf16, as the kernel stores
    it) per assignment, weights dequantized. `quantize=False`: activations left unquantized."""
    d = dispatch(routing, w13.shape[0])
    xq = fake_quantize_rows(x, w13.input_scale) if quantize else x.float()
    h13 = linear_fp8_dequantized(xq[d.token_index], w13, d)
    gate, up = h13.chunk(2, dim=-1)
    h = (F.silu(gate) * up).to(x.dtype)
    hq = fake_quantize_rows(h, w2.input_scale) if quantize else h.float()
    y = linear_fp8_dequantized(hq, w2, d) * d.weights.unsqueeze(1)
    return torch.zeros(x.shape, device=x.device).index_add_(0, d.token_index, y)


@pytest.mark.parametrize("T", [1, 3, 16, 64, 333, 2048])
@pytest.mark.parametrize("skew", [False, True])
def test_fused_fp8_moe_matches_the_dequantized_reference(T, skew):
    needs_fp8()
    x, w13, w2, routing = fp8_moe_problem(T, skew=skew, seed=T)
    got = fused_moe(x, w13, w2, routing.weights, routing.experts)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, w8a8_reference(x, w13, w2, routing)) < W8A8_BOUND
    assert relative_error(got, w8a8_reference(x, w13, w2, routing, quantize=False)) < FP8_COST_BOUND


@pytest.mark.parametrize("configs", [row[1:] for row in MOE_FP8_TILE_CONFIGS])
def test_every_fp8_tile_config_is_correct(configs):
    needs_fp8()
    x, w13, w2, routing = fp8_moe_problem(100, H=256, Fn=384)
    got = fused_moe(x, w13, w2, routing.weights, routing.experts, configs=configs)
    assert relative_error(got, w8a8_reference(x, w13, w2, routing)) < W8A8_BOUND


def test_fused_fp8_moe_with_static_input_scales():
    needs_fp8()
    x, w13, w2, routing = fp8_moe_problem(50, static=True)
    got = fused_moe(x, w13, w2, routing.weights, routing.experts)
    assert relative_error(got, w8a8_reference(x, w13, w2, routing)) < W8A8_BOUND


@pytest.mark.parametrize("T", [1, 64])
def test_fused_w8a16_moe_matches_the_unquantized_activations(T):
    x, w13, w2, routing = fp8_moe_problem(T, seed=T)
    got = fused_moe(x, w13, w2, routing.weights, routing.experts, fp8_activations=False)
    assert relative_error(got, w8a8_reference(x, w13, w2, routing, quantize=False)) < W8A8_BOUND


@pytest.mark.parametrize("T", [3, 200])
def test_fused_fp8_moe_skips_the_assignments_of_other_ranks(T):
    needs_fp8()
    x, w13, w2, routing = fp8_moe_problem(T, seed=T)
    here = routing.experts < 4
    local = Routing(routing.weights, torch.where(here, routing.experts, 4), elsewhere=True)
    masked = Routing(torch.where(here, routing.weights, 0.0), torch.where(here, routing.experts, 0))
    w13_local, w2_local = (Fp8Weight(Fp8Tensors(w.weight[:4], w.weight_scale[:4])) for w in (w13, w2))
    got = fused_moe(x, w13_local, w2_local, local.weights, local.experts, elsewhere=True)
    assert relative_error(got, w8a8_reference(x, w13_local, w2_local, masked)) < W8A8_BOUND


@pytest.mark.parametrize("T", [1, 40, 1500])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_grouped_gemm_path_matches_the_dequantized_reference(T, static):
    needs_fp8()
    x, w13, w2, routing = fp8_moe_problem(T, seed=T, static=static)
    got = moe_experts(x, w13, w2, dispatch(routing, 8), F.silu, load_scaled_grouped_mm())
    assert got.dtype == torch.bfloat16
    assert relative_error(got, w8a8_reference(x, w13, w2, routing)) < W8A8_BOUND
    fused = fused_moe(x, w13, w2, routing.weights, routing.experts)
    assert relative_error(got, fused) < W8A8_BOUND


# -- the model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    """A tiny Mixtral (float), its FP8 values as a float checkpoint, and adapters on every target."""
    from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, write_per_expert_adapter
    from tests.models.test_fp8_compute import write_quantized_then_dequantized
    from tests.tiny_mixtral import save_tiny_mixtral

    root = tmp_path_factory.mktemp("fp8_gpu")
    hf = save_tiny_mixtral(root / "base", hidden_size=128, intermediate_size=256, head_dim=32)
    write_quantized_then_dequantized(root / "base", root / "requantized")
    make_peft_adapter(hf, root / "a1", seed=1, r=2, target_modules=ATTENTION_AND_HEAD)
    make_peft_adapter(hf, root / "a2", seed=2, r=16, target_modules=["w1", "w2", "w3", "gate"])
    write_per_expert_adapter(hf, root / "a3", seed=3, r=5)
    return root


SEQUENCES = [list(range(2, 17)), list(range(40, 50)), list(range(60, 80)), list(range(10, 22))]


def served_logits(model, root, adapters: bool, device, dtype, kernels=True):
    from tests.adapters.peft_adapters import store_for
    from tests.tiny_mixtral import paged_logits

    store = None
    if adapters:
        store = store_for(model, dtype=dtype, device=device)
        store.use_kernels = kernels
        for i in (1, 2, 3):
            store.load(i, root / f"a{i}")
    return paged_logits(model, SEQUENCES, [9, 4, 14, 6], adapters=store, adapter_indices=[0, 1, 2, 3] if adapters
                        else None, device=device, dtype=dtype)


@pytest.mark.parametrize("adapters", [False, True])
def test_tiny_model_in_fp8_against_the_float_model_of_its_fp8_values(tiny_fp8, adapters):
    """bf16 + FP8 GEMMs (Triton experts, scaled_mm attention, LoRA kernels incl. expert LoRA inside the fused
    FP8 kernels) against fp32 over the same FP8 values. What quantized activations cost this tiny random model
    was measured on the CPU by quantizing them in the float model (same fp32 oracle): 0.03-0.05 per sequence,
    0.006-0.19 with adapters (the per-expert adapter's deltas are larger than the weights they change), top-1
    agreement 0.88 / 1.0. The bounds leave room for bf16."""
    from lorax_server.utils.backends import CHOSEN
    from tests.models.test_fp8_compute import load

    needs_fp8()
    fp8 = load(tiny_fp8 / "base", fp8=True, dtype=torch.bfloat16, device=DEV)
    assert CHOSEN["fp8"] == "scaled_mm" and CHOSEN["moe"] == "triton"
    fp32 = load(tiny_fp8 / "requantized", fp8=False, dtype=torch.float32, device=DEV)
    want = served_logits(fp32, tiny_fp8, adapters, DEV, torch.float32, kernels=False)
    got = served_logits(fp8, tiny_fp8, adapters, DEV, torch.bfloat16)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) < (0.3 if adapters else 0.1), errors
    agree = torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]).float().mean()
    assert agree > 0.75, agree


def test_fp8_decode_step_is_capturable(tiny_fp8):
    from lorax_server.engine.cache import PagedKVCache, PagedSequence
    from lorax_server.engine.runner import pack
    from tests.models.test_fp8_compute import load

    needs_fp8()
    model = load(tiny_fp8 / "base", fp8=True, dtype=torch.bfloat16, device=DEV)
    cache = PagedKVCache(2, 32, 16, model.num_kv_heads, model.head_dim, torch.bfloat16, DEV)
    seqs = [PagedSequence(list(range(30)), 0, cached=29) for _ in range(4)]
    inputs = pack(seqs, [1] * 4, cache, False, DEV).model_inputs(cache.layers)
    eager, _ = model(**inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = model(**inputs)
    graph.replay()
    assert relative_error(captured, eager) < 1e-3
