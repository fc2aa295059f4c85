"""FP8 layout and quantization on the CPU: round trips, per-tensor and per-channel scales as stored by the two
checkpoint layouts, tensor-parallel slices of the scales, the CPU (dequantizing) linear and MoE experts, merges,
and the refusals (no FP8 tensor cores, a backend that cannot run here)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lorax_server.utils.backends import CHOSEN, BackendUnavailable, choose
from lorax_server.layers.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Tensors,
    Fp8Weight,
    add_delta,
    cat_fp8,
    dequantize,
    fake_quantize_rows,
    fp8_linear_backends,
    gpu_without_fp8,
    load_fp8,
    load_fp8_col,
    load_fp8_row,
    quantize_rows_reference,
    quantize_weight,
)
from lorax_server.layers.linear import TensorParallelColumnLinear, TensorParallelRowLinear
from lorax_server.layers.moe import dispatch, expert_backend, linear_per_expert, moe_experts, route
from lorax_server.layers.moe.experts import linear_fp8_dequantized
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.quantization import Fp8Checkpoint, check_fp8_device
from lorax_server.utils.weights import Weights

OUT, IN = 64, 48


def random_weight(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-2, 1, shape[-2]).unsqueeze(-1)  # rows of every size


# -- quantization ----------------------------------------------------------------------------------------


def test_weight_round_trip_is_within_e4m3_rounding_per_channel():
    w = random_weight(3, OUT, IN)
    q = quantize_weight(w)
    assert q.weight.dtype == FP8 and q.weight.shape == w.shape and q.weight_scale.shape == (3, OUT)
    torch.testing.assert_close(q.weight_scale, w.abs().amax(-1) / FP8_MAX)
    assert q.weight.float().abs().amax(-1).eq(FP8_MAX).all()  # each row's largest value maps to 448
    back = dequantize(q.weight, q.weight_scale)
    # e4m3 keeps 3 mantissa bits: half a unit in the last place is 1/16 of the value (normals); below the
    # smallest normal (2^-6) the step is 2^-9 of the scale
    bound = w.abs() / 16 + q.weight_scale.unsqueeze(-1) * 2**-10
    assert ((back - w).abs() <= bound).all()


def test_quantizing_dequantized_values_gives_them_back():
    q = quantize_weight(random_weight(OUT, IN))
    again = quantize_weight(dequantize(q.weight, q.weight_scale))
    torch.testing.assert_close(again.weight_scale, q.weight_scale, rtol=1e-6, atol=0)
    assert torch.equal(dequantize(again.weight, again.weight_scale), dequantize(q.weight, q.weight_scale))


def test_zero_rows_and_saturation_give_no_nan():
    w = random_weight(4, IN)
    w[1] = 0
    q = quantize_weight(w)
    assert torch.equal(q.weight[1].float(), torch.zeros(IN)) and q.weight_scale[1] > 0
    x8, scale = quantize_rows_reference(torch.full((2, 8), 1e4), torch.tensor(1.0))  # static scale: clipped
    assert torch.equal(x8.float(), torch.full((2, 8), FP8_MAX)) and torch.equal(scale, torch.ones(2))


def test_activation_rows_dynamic_and_static():
    x = random_weight(5, IN).t().contiguous()  # [IN rows, 5]
    x8, scale = quantize_rows_reference(x)
    torch.testing.assert_close(scale, x.abs().amax(-1) / FP8_MAX)
    fake = fake_quantize_rows(x)
    assert ((fake - x).abs() <= x.abs() / 16 + scale.unsqueeze(-1) * 2**-10).all()
    static = torch.tensor(0.01)
    x8, scale = quantize_rows_reference(x, static)
    assert torch.equal(scale, torch.full((IN,), 0.01))
    assert torch.equal(x8, (x / 0.01).clamp(-FP8_MAX, FP8_MAX).to(FP8))


def test_fused_parts_keep_their_own_scales_and_share_the_largest_input_scale():
    parts = [Fp8Tensors(*quantize_weight(random_weight(OUT, IN, seed=s))[:2], torch.tensor(s + 1.0)) for s in range(3)]
    fused = cat_fp8(parts)
    assert fused.weight.shape == (3 * OUT, IN) and torch.equal(fused.weight_scale[OUT:2 * OUT], parts[1].weight_scale)
    assert fused.input_scale == 3.0
    assert cat_fp8([parts[0], parts[1]._replace(input_scale=None)]).input_scale is None  # dynamic unless all static
    stacked = cat_fp8(parts, dim=None)
    assert stacked.weight.shape == (3, OUT, IN) and stacked.weight_scale.shape == (3, OUT)


# -- the stored layouts and their tensor-parallel slices ---------------------------------------------------

LAYOUTS = {  # scale as stored beside each weight: (per channel, dtype, shape of a per-tensor scale)
    "autofp8": (False, torch.float32, ()),
    "compressed_tensors_tensor": (False, torch.float32, (1,)),
    "compressed_tensors_channel": (True, torch.bfloat16, None),
}


def store(weight: torch.Tensor, per_channel: bool, dtype, shape):
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    scale = (amax / FP8_MAX).to(dtype)
    fp8 = (weight / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return fp8, scale if per_channel else scale.reshape(shape)


@pytest.fixture(params=sorted(LAYOUTS))
def stored(request, tmp_path):
    """A checkpoint with two FP8 weights `a`, `b` [OUT, IN] (`a` with a static input scale) and a float `c`."""
    per_channel, dtype, shape = LAYOUTS[request.param]
    tensors = {}
    for seed, name in enumerate("ab"):
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = store(random_weight(OUT, IN, seed=seed),
                                                                           per_channel, dtype, shape)
    tensors["a.input_scale"] = torch.tensor(0.25)
    tensors["c.weight"] = random_weight(OUT, IN, seed=7)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", tensors


def weights_over(path, rank=0, world=1):
    weights = Weights([path], "cpu", torch.float32, FakeGroup(rank, world),
                      quantization=Fp8Checkpoint("compressed-tensors", "test"))
    weights.fp8_compute = True
    return weights


def expected_scale(tensors, name):
    """The stored scale as one float32 per output row."""
    return tensors[f"{name}.weight_scale"].float().reshape(-1).expand(OUT)


def test_a_stored_fp8_weight_is_served_as_stored(stored):
    path, tensors = stored
    weights = weights_over(path)
    a = load_fp8(weights, "a.weight", None, (OUT, IN))
    assert torch.equal(a.weight.float(), tensors["a.weight"].float())
    assert a.weight_scale.dtype == torch.float32 and torch.equal(a.weight_scale, expected_scale(tensors, "a"))
    assert a.input_scale == 0.25 and load_fp8(weights, "b.weight", None, (OUT, IN)).input_scale is None
    assert {"a.weight", "a.weight_scale", "a.input_scale"} <= weights.used
    # what the dequantize-on-load path reads, exactly
    plain = Weights([path], "cpu", torch.float32, FakeGroup(0, 1), quantization=Fp8Checkpoint("fp8", "test"))
    assert torch.equal(dequantize(a.weight, a.weight_scale), plain.get_tensor("a.weight"))


@pytest.mark.parametrize("rank", [0, 1])
def test_shards_slice_the_scales_of_column_parallel_rows_and_replicate_those_of_row_parallel(stored, rank):
    path, tensors = stored
    whole = load_fp8_col(weights_over(path), ["a", "b"], [(OUT, IN)] * 2)
    col = load_fp8_col(weights_over(path, rank, 2), ["a", "b"], [(OUT, IN)] * 2)
    half = slice(rank * OUT // 2, (rank + 1) * OUT // 2)
    rows = torch.cat([torch.arange(OUT)[half], OUT + torch.arange(OUT)[half]])  # a's rows, then b's
    assert torch.equal(col.weight.float(), whole.weight.float()[rows])
    assert torch.equal(col.weight_scale, whole.weight_scale[rows])
    assert col.input_scale is None  # b has none: dynamic
    row = load_fp8_row(weights_over(path, rank, 2), "a", (OUT, IN))
    cols = slice(rank * IN // 2, (rank + 1) * IN // 2)
    assert torch.equal(row.weight.float(), tensors["a.weight"].float()[:, cols])
    assert torch.equal(row.weight_scale, expected_scale(tensors, "a"))  # every row's scale on every rank
    assert row.input_scale == 0.25


@pytest.mark.parametrize("rank", [0, 1])
def test_a_float_weight_is_quantized_per_row_of_this_ranks_shard(stored, rank):
    path, tensors = stored
    c = tensors["c.weight"]
    col = load_fp8(weights_over(path, rank, 2), "c.weight", 0, (OUT, IN))
    whole = quantize_weight(c)
    half = slice(rank * OUT // 2, (rank + 1) * OUT // 2)
    assert torch.equal(col.weight.float(), whole.weight.float()[half]) and col.input_scale is None
    row = load_fp8(weights_over(path, rank, 2), "c.weight", 1, (OUT, IN))
    shard = quantize_weight(c[:, rank * IN // 2:(rank + 1) * IN // 2])
    assert torch.equal(row.weight.float(), shard.weight.float()) and torch.equal(row.weight_scale, shard.weight_scale)


# -- the CPU path: dequantize, then an ordinary matmul -----------------------------------------------------


def test_fp8_linears_on_cpu_are_the_dequantized_linears(stored, monkeypatch):
    path, _ = stored
    monkeypatch.delenv("LORAX_FP8_BACKEND", raising=False)
    x = torch.randn(7, IN)
    qkv = TensorParallelColumnLinear.load_multi(weights_over(path), ["a", "b"], [(OUT, IN)] * 2)
    assert qkv.weight.dtype == FP8 and CHOSEN["fp8"] == "dequantize"
    torch.testing.assert_close(qkv(x), x @ dequantize(qkv.weight, qkv.weight_scale).t(), rtol=0, atol=0)
    o = TensorParallelRowLinear.load(weights_over(path), "a", (OUT, IN))
    assert set(dict(o.named_buffers())) == {"weight_scale", "input_scale"}
    torch.testing.assert_close(o(x), x @ dequantize(o.weight, o.weight_scale).t(), rtol=0, atol=0)


def test_asking_for_scaled_mm_on_a_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("LORAX_FP8_BACKEND", "scaled_mm")
    with pytest.raises(BackendUnavailable, match="LORAX_FP8_BACKEND=scaled_mm is not available on cpu: FP8 GEMMs "
                                                 "need a CUDA GPU"):
        choose("fp8", fp8_linear_backends(OUT, IN), torch.device("cpu"))


def test_a_gpu_without_fp8_tensor_cores_is_refused_by_name(monkeypatch):
    assert gpu_without_fp8("NVIDIA H200", (9, 0)) is None and gpu_without_fp8("NVIDIA L4", (8, 9)) is None
    reason = gpu_without_fp8("NVIDIA A100-SXM4-80GB", (8, 0))
    assert reason == ("this GPU (NVIDIA A100-SXM4-80GB, compute capability 8.0) has no FP8 tensor cores, which need "
                      "compute capability 8.9 or newer (Ada, Hopper and later)")
    monkeypatch.setattr("lorax_server.utils.quantization.fp8_unsupported", lambda device: reason)
    with pytest.raises(ValueError, match=r"quantization 'fp8' is not supported on this machine: this GPU \(NVIDIA "
                                         r"A100-SXM4-80GB, compute capability 8.0\) has no FP8 tensor cores"):
        check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))  # a CPU dequantizes


def test_fp8_experts_on_cpu_are_the_dequantized_experts(monkeypatch):
    monkeypatch.delenv("LORAX_MOE_BACKEND", raising=False)
    E, H, Fn, T = 4, 32, 48, 23
    w13 = Fp8Weight(quantize_weight(random_weight(E, 2 * Fn, H, seed=1)))
    w2 = Fp8Weight(quantize_weight(random_weight(E, H, Fn, seed=2)))
    x = torch.randn(T, H)
    d = dispatch(route(torch.randn(T, E), 2), E)
    impl = expert_backend(H, Fn, w2.dtype, torch.device("cpu"))
    assert impl.linear is linear_fp8_dequantized and impl.fused is None and CHOSEN["moe"] == "reference"
    got = moe_experts(x, w13, w2, d, F.silu, impl.linear)
    want = moe_experts(x, w13.dequantize(x.dtype), w2.dequantize(x.dtype), d, F.silu, linear_per_expert)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setenv("LORAX_MOE_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="LORAX_MOE_BACKEND=triton is not available on cpu"):
        expert_backend(H, Fn, w2.dtype, torch.device("cpu"))


# -- merging a LoRA delta into FP8 rows ----------------------------------------------------------------------


def test_a_delta_added_to_fp8_rows_requantizes_only_those_rows():
    q = quantize_weight(random_weight(OUT, IN))
    weight, scale = q.weight.clone(), q.weight_scale.clone()
    delta = torch.randn(8, IN)
    add_delta(weight, scale, slice(8, 16), delta)
    want = quantize_weight(dequantize(q.weight[8:16], q.weight_scale[8:16]) + delta)
    assert torch.equal(weight[8:16].float(), want.weight.float()) and torch.equal(scale[8:16], want.weight_scale)
    assert torch.equal(weight[16:].float(), q.weight[16:].float()) and torch.equal(scale[:8], q.weight_scale[:8])
    stacked = quantize_weight(random_weight(2, OUT, IN))
    weight, scale = stacked.weight.clone(), stacked.weight_scale.clone()
    add_delta(weight, scale, 1, torch.randn(OUT, IN))  # one expert of a stack
    assert torch.equal(weight[0].float(), stacked.weight[0].float())
    plain = random_weight(OUT, IN)
    add_delta(plain, None, slice(0, 8), torch.ones(8, IN))  # a float weight: in place, no scales
    assert torch.equal(plain[:8], random_weight(OUT, IN)[:8] + 1)
