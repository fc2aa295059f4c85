"""FP8 checkpoints in both layouts load exactly (dequantized to the compute dtype), on one rank and as
tensor-parallel shards; every other quantization method, and tensors no config explains, are refused by
name before any weight is read.

The FP8 layouts are written here as the tools write them (no weights can be downloaded): a tiny random
Mixtral's attention and expert linears quantized to float8_e4m3fn, router gate and lm_head left in float,
  - AutoFP8 (neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8): 0-d float32 `weight_scale` and `input_scale`;
  - compressed-tensors `float-quantized` (llm-compressor): FP8_DYNAMIC's per-channel [out, 1] bf16 scales,
    or static per-tensor [1] scales with input scales and an FP8 KV-cache scheme's k_scale/v_scale.
The oracle is transformers over a float checkpoint holding the dequantized values (weight * scale).
"""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models import get_model
from lorax_server.models.custom_modeling.flash_mixtral_modeling import (
    DenseMoE,
    ExpertParallelMoE,
    FlashMixtralForCausalLM,
    MixtralConfig,
)
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.quantization import checkpoint_quantization
from lorax_server.utils.weights import CheckpointError, Weights, weight_files
from tests.tiny_mixtral import paged_logits, reference_logits, relative_error, save_tiny_mixtral

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|experts\.\d+\.w[123])\.weight$")
LAYERS = 2
SEQUENCES = [list(range(3, 20)), list(range(50, 58)), list(range(20, 43))]
PROMPT_LENS = [11, 3, 17]
MOE_CLASSES = {"sparse": {}, "dense": {"moe_cls": DenseMoE}, "expert_parallel": {"moe_cls": ExpertParallelMoE}}
KV = 1 << 20

AUTOFP8_CONFIG = {
    "quant_method": "fp8", "activation_scheme": "static",
    "ignored_layers": ["lm_head"] + [f"model.layers.{i}.block_sparse_moe.gate" for i in range(LAYERS)],
}


def compressed_tensors_config(strategy: str) -> dict:
    """What llm-compressor writes: FP8_DYNAMIC (channel, dynamic per-token activations) or FP8 (static tensor)."""
    static = strategy == "tensor"
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                   "strategy": "tensor" if static else "token", "group_size": None, "block_structure": None,
                   "actorder": None, "observer": "minmax" if static else None, "observer_kwargs": {}}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    kv_cache = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "global_compression_ratio": 1.46, "sparsity_config": {}, "kv_cache_scheme": kv_cache if static else None,
        "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None}},
    }


# layout -> (scale per output channel, scale dtype, scale shape for per-tensor, quantization_config)
LAYOUTS = {
    "autofp8": (False, torch.float32, (), AUTOFP8_CONFIG),
    "compressed_tensors_channel": (True, torch.bfloat16, None, compressed_tensors_config("channel")),
    "compressed_tensors_tensor": (False, torch.float32, (1,), compressed_tensors_config("tensor")),
}


def quantize(weight: torch.Tensor, per_channel: bool, scale_dtype, scale_shape):
    """(fp8 weight, its scale as stored): absmax scaling to the e4m3 range, as AutoFP8 and llm-compressor do."""
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12).to(scale_dtype)  # rounded as stored, then used to quantize
    fp8 = (weight / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return fp8, scale if per_channel else scale.reshape(scale_shape)


def write_fp8_layout(source, fp8_dir, dequantized_dir, layout: str) -> None:
    """`source` (a float checkpoint) written as the FP8 `layout`, and as float weights of the dequantized values."""
    per_channel, scale_dtype, scale_shape, quantization_config = LAYOUTS[layout]
    fp8_tensors, dequantized = {}, {}
    for name, weight in load_file(source / "model.safetensors").items():
        dequantized[name] = fp8_tensors[name] = weight
        if not QUANTIZED.search(name):
            continue
        fp8, scale = quantize(weight, per_channel, scale_dtype, scale_shape)
        fp8_tensors[name], fp8_tensors[name + "_scale"] = fp8, scale
        if layout != "compressed_tensors_channel":  # static activation scales: needed by FP8 compute only
            fp8_tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.02).reshape(scale_shape)
        dequantized[name] = fp8.float() * scale.float()
    if quantization_config["quant_method"] == "compressed-tensors" and quantization_config["kv_cache_scheme"]:
        for layer in range(LAYERS):  # the FP8 KV cache's scales: unused with a cache in the compute dtype
            for kv in ("k_scale", "v_scale"):
                fp8_tensors[f"model.layers.{layer}.self_attn.{kv}"] = torch.tensor(0.1)
    config = json.loads((source / "config.json").read_text())
    for directory, tensors, extra in ((fp8_dir, fp8_tensors, {"quantization_config": quantization_config}),
                                      (dequantized_dir, dequantized, {})):
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps({**config, **extra}))


def load_checkpoint(directory, group=None, dtype=torch.float32, **kwargs) -> FlashMixtralForCausalLM:
    """Our model over `directory` with the quantization its config.json declares (as FlashMixtral loads it)."""
    values = json.loads((directory / "config.json").read_text())
    weights = Weights(weight_files(directory), "cpu", dtype, group or FakeGroup(0, 1),
                      quantization=checkpoint_quantization(values, directory))
    return FlashMixtralForCausalLM("", MixtralConfig.from_dict(values), weights, **kwargs).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """root with `original` (float), and per layout `<layout>` (FP8) and `<layout>_dequantized` (float)."""
    root = tmp_path_factory.mktemp("fp8")
    save_tiny_mixtral(root / "original", num_hidden_layers=LAYERS, vocab_size=97)
    for layout in LAYOUTS:
        write_fp8_layout(root / "original", root / layout, root / f"{layout}_dequantized", layout)
    return root


def add_tokenizer(directory):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)


def copy_checkpoint(checkpoints, layout, destination):
    shutil.copytree(checkpoints / layout, destination)
    add_tokenizer(destination)
    return destination


# -- FP8 loads exactly ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_is_stored_as_the_tools_store_it(checkpoints, layout):
    tensors = load_file(checkpoints / layout / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight"].dtype == FP8
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.float32
    expected = {"autofp8": [], "compressed_tensors_channel": [64, 1], "compressed_tensors_tensor": [1]}[layout]
    assert list(tensors[f"{q}.weight_scale"].shape) == expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_match_transformers_over_the_dequantized_weights(checkpoints, layout):
    reference = transformers.MixtralForCausalLM.from_pretrained(checkpoints / f"{layout}_dequantized").eval()
    original = transformers.MixtralForCausalLM.from_pretrained(checkpoints / "original").eval()
    ours = paged_logits(load_checkpoint(checkpoints / layout), SEQUENCES, PROMPT_LENS, block_size=4)
    for got, tokens in zip(ours, SEQUENCES):
        want = reference_logits(reference, tokens)
        assert relative_error(got, want) <= 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        # The reference is not the float model: the test would see scales ignored or misapplied.
        assert relative_error(want, reference_logits(original, tokens)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("moe", sorted(MOE_CLASSES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tensor_parallel_shards_are_the_dequantized_shards(checkpoints, layout, moe, dtype):
    """Each rank's every parameter is exactly its slice of the dequantized weights: per-channel scales are
    sliced with their rows, per-tensor ones replicated, and q/k/v and w1/w3 each scaled before joining."""
    for rank in range(2):
        group = FakeGroup(rank, 2)
        ours = load_checkpoint(checkpoints / layout, group, dtype, **MOE_CLASSES[moe]).state_dict()
        want = load_checkpoint(checkpoints / f"{layout}_dequantized", group, dtype, **MOE_CLASSES[moe]).state_dict()
        assert ours.keys() == want.keys()
        for name, tensor in want.items():
            assert tensor.dtype == dtype and torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fp8_checkpoint_serves_with_or_without_quantize_fp8(checkpoints, layout, tmp_path):
    """Without --quantize the weights are dequantized on load; with --quantize fp8 they stay FP8
    (tests/models/test_fp8_compute.py compares the two)."""
    directory = copy_checkpoint(checkpoints, layout, tmp_path / "m")
    for quantize, dtype in ((None, torch.float32), ("fp8", torch.float8_e4m3fn)):
        model = get_model(str(directory), quantize=quantize, dtype="float32", kv_cache_bytes=KV)
        assert model.model.model.layers[0].moe.expert_w13.dtype == dtype
        assert model.model.model.layers[0].moe.gate.dtype == torch.float32
    with pytest.raises(ValueError, match=r"quantization 'gptq' is not supported by this server: the checkpoint is "
                                         r"FP8 \((fp8|compressed-tensors), "):
        get_model(str(directory), quantize="gptq", dtype="float32", kv_cache_bytes=KV)


# -- every other method is refused by name, from config.json alone ---------------------------------------

W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                       "symmetric": True}}}, "ignore": ["lm_head"]}
W8A8_INT = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}
FP8_BLOCK_CT = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
    "format": "float-quantized", "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}}}}


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
     r"quant_method 'gptq' \(4-bit weights\) is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
     r"quant_method 'awq' \(4-bit weights\) is not supported"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
     r"quant_method 'bitsandbytes' \(4-bit nf4\) is not supported"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, r"quant_method 'bitsandbytes' \(8-bit LLM.int8\) is not"),
    ({"quant_method": "eetq", "weights": "int8"}, "quant_method 'eetq' is not supported"),
    (W4A16, r"'compressed-tensors', group group_0: format 'pack-quantized' \(weights int 4-bit, strategy group\) is "
            r"not supported"),
    (W8A8_INT, r"group group_0: format 'int-quantized' \(weights int 8-bit, strategy channel\) is not supported"),
    (FP8_BLOCK_CT, r"format 'float-quantized' \(weights float 8-bit, strategy block\) is not supported; only "
                   r"symmetric FP8 weights with strategy 'tensor' or 'channel' are"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     r"quant_method 'fp8' with weight_block_size \[128, 128\] \(block-wise scales\) is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "quant_method 'fp8' with fmt 'e5m2' is not supported"),
    ({**compressed_tensors_config("channel"), "sparsity_config": {"format": "sparse-24-bitmask"}},
     "with sparsity format 'sparse-24-bitmask' is not supported"),
])
def test_other_methods_are_refused_by_name_from_the_config_alone(tmp_path, quantization_config, message):
    """The directory holds only config.json: the refusal cannot have come from the weights or the tokenizer."""
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(CheckpointError, match=message):
        get_model(str(tmp_path), kv_cache_bytes=KV)


def test_autogptq_quantize_config_file_is_refused(tmp_path):
    shutil.copy(DEFAULT_MODEL_DIR / "config.json", tmp_path / "config.json")
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(CheckpointError, match=r"a GPTQ checkpoint \(AutoGPTQ's quantize_config.json\) is not "):
        get_model(str(tmp_path), kv_cache_bytes=KV)


# -- tensors the config does not explain: refused from the headers, before any data is read --------------

Q = "model.layers.0.self_attn.q_proj"


def edit_tensors(directory, edit, config_edit=None):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((directory / "config.json").read_text())
        config_edit(config)
        (directory / "config.json").write_text(json.dumps(config))


def drop_quantization_config(config):
    del config["quantization_config"]


@pytest.mark.parametrize("edit, config_edit, message", [
    (lambda t: None, drop_quantization_config,
     r"tensor model.layers.0.block_sparse_moe.experts.0.w1.weight is stored as F8_E4M3 \(FP8\), but config.json has "
     r"no quantization_config saying how it is scaled"),
    (lambda t: t.pop(f"{Q}.weight_scale"), None, f"tensor {Q}.weight is stored as F8_E4M3 but its scale "
                                                 f"{Q}.weight_scale is missing"),
    (lambda t: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"].float().to(torch.float8_e5m2)), None,
     f"tensor {Q}.weight is stored as F8_E5M2, not as floating-point numbers: an FP8 "),
    (lambda t: t.__setitem__(f"{Q}.weight_scale", torch.ones(1, 1)), None, None),  # [1, 1]: per-tensor, accepted
    (lambda t: t.__setitem__(f"{Q}.weight_scale", torch.ones(2, 2)), None,
     rf"tensor {Q}.weight_scale: shape \[2, 2\] for a weight of shape \[64, 64\]; only per-tensor and "
     rf"per-output-channel \[out, 1\] scales are supported"),
    (lambda t: t.__setitem__(f"{Q}.weight_scale", torch.ones(64)), None, r"shape \[64\] for a weight of shape"),
    (lambda t: t.__setitem__(f"{Q}.weight_scale", torch.ones((), dtype=torch.int32)), None,
     f"tensor {Q}.weight_scale is stored as I32"),
    (lambda t: t.__setitem__(f"{Q}.qweight", torch.zeros(8, 64, dtype=torch.int32)), None,
     rf"tensor {Q}.qweight is stored as I32, not as floating-point numbers: an FP8 \(fp8, .*\) checkpoint stores only "
     rf"float8_e4m3 weights and float tensors"),
    (lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(())), None,
     "tensor this model never reads: lm_head.weight_scale"),  # a scale beside a float weight: found after loading
    (lambda t: t.__setitem__("model.layers.0.self_attn.x_proj.input_scale", torch.ones(())), None,
     "tensor this model never reads: model.layers.0.self_attn.x_proj.input_scale"),  # an activation scale of nothing
])
def test_tensors_the_config_does_not_explain_are_refused(checkpoints, tmp_path, monkeypatch, edit, config_edit,
                                                         message):
    directory = copy_checkpoint(checkpoints, "autofp8", tmp_path / "m")
    edit_tensors(directory, edit, config_edit)
    if message is None:
        get_model(str(directory), dtype="float32", kv_cache_bytes=KV)
        return
    if "never reads" not in message:
        monkeypatch.setattr(Weights, "_read", lambda *args: pytest.fail("weights were read before the refusal"))
    with pytest.raises(CheckpointError, match=message):
        get_model(str(directory), dtype="float32", kv_cache_bytes=KV)


@pytest.mark.parametrize("quantize", [None, "fp8"])
@pytest.mark.parametrize("name, value, message", [
    ("weight_scale", torch.tensor(float("nan")), r"weight_scale: 1 of its 1 values are NaN, infinite or negative"),
    ("weight_scale", torch.tensor(float("inf")), "NaN, infinite or negative"),
    ("weight_scale", torch.tensor(-0.5), r"NaN, infinite or negative \(e.g. -0.5\)"),
    ("input_scale", torch.tensor(float("nan")), r"input_scale: 1 of its 1 values are NaN, infinite or not positive"),
    ("input_scale", torch.tensor(0.0), "NaN, infinite or not positive"),
    ("input_scale", torch.ones(2), r"input_scale: shape \[2\]; a static activation scale is one number"),
])
def test_broken_scale_values_are_refused_by_name(checkpoints, tmp_path, quantize, name, value, message):
    """A NaN, infinite or negative weight scale (or an activation scale that is not positive, or not one number)
    would make every logit of every request NaN or wrong: refused at load, naming the tensor. An activation scale
    matters only to FP8 compute; loaded in the compute dtype it is not read."""
    directory = copy_checkpoint(checkpoints, "autofp8", tmp_path / "m")
    edit_tensors(directory, lambda t: t.__setitem__(f"{Q}.{name}", value))
    if name == "input_scale" and quantize is None:
        get_model(str(directory), dtype="float32", kv_cache_bytes=KV)
        return
    with pytest.raises(CheckpointError, match=message) as refused:
        get_model(str(directory), dtype="float32", kv_cache_bytes=KV, quantize=quantize)
    assert str(refused.value).startswith(f"tensor {Q}.{name}: ")
