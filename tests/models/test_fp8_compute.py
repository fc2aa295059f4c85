"""`--quantize fp8` on the CPU, where every FP8 weight is dequantized in its matmul: the model must then equal
the float model over the dequantized weights, whatever the checkpoint stored.

- a float checkpoint quantized at load (one scale per output channel) against a float checkpoint holding the
  values quantize-then-dequantize gives;
- an FP8 checkpoint served in FP8 (AutoFP8, compressed-tensors per-tensor and per-channel) against the same
  checkpoint dequantized on load, logits and every parameter, on one rank and as tensor-parallel shards;
- LoRA on an FP8 base (attention and lm_head, router, experts in both adapter layouts; one mixed batch), and
  merging an adapter into FP8 weights.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax_server.utils.backends import CHOSEN
from lorax_server.layers.fp8 import FP8, dequantize, quantize_weight
from lorax_server.models import get_model
from lorax_server.models.custom_modeling.flash_mixtral_modeling import FlashMixtralForCausalLM, MixtralConfig
from lorax_server.models.merge_adapter import merge_into
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.quantization import checkpoint_quantization
from lorax_server.utils.weights import Weights, weight_files
from tests.adapters.peft_adapters import ATTENTION_AND_HEAD, make_peft_adapter, store_for, write_per_expert_adapter
from tests.models.test_fp8_checkpoints import (
    KV,
    LAYERS,
    LAYOUTS,
    MOE_CLASSES,
    PROMPT_LENS,
    QUANTIZED,
    SEQUENCES,
    add_tokenizer,
    write_fp8_layout,
)
from tests.tiny_mixtral import paged_logits, relative_error, save_tiny_mixtral


def load(directory, fp8: bool, group=None, dtype=torch.float32, device="cpu", **kwargs) -> FlashMixtralForCausalLM:
    """Our model over `directory`, in FP8 (`--quantize fp8`) or as the checkpoint's config.json says."""
    values = json.loads((directory / "config.json").read_text())
    weights = Weights(weight_files(directory), device, dtype, group or FakeGroup(0, 1),
                      quantization=checkpoint_quantization(values, directory))
    weights.fp8_compute = fp8
    return FlashMixtralForCausalLM("", MixtralConfig.from_dict(values), weights, **kwargs).eval()


def write_quantized_then_dequantized(source, destination) -> None:
    """`source` with each weight --quantize fp8 serves in FP8 replaced by its per-channel FP8 values, in float."""
    tensors = load_file(source / "model.safetensors")
    for name, weight in tensors.items():
        if QUANTIZED.search(name):
            tensors[name] = dequantize(*quantize_weight(weight)[:2])
    destination.mkdir()
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", destination / "config.json")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """root with `original` (float), `requantized` (float: its FP8 values), FP8 layouts, adapters a1-a3."""
    root = tmp_path_factory.mktemp("fp8_compute")
    hf = save_tiny_mixtral(root / "original", num_hidden_layers=LAYERS, vocab_size=97)
    write_quantized_then_dequantized(root / "original", root / "requantized")
    for layout in LAYOUTS:
        write_fp8_layout(root / "original", root / layout, root / f"{layout}_dequantized", layout)
    make_peft_adapter(hf, root / "a1", seed=1, r=2, target_modules=ATTENTION_AND_HEAD)
    make_peft_adapter(hf, root / "a2", seed=2, r=8, target_modules=["w1", "w2", "w3", "gate"])
    write_per_expert_adapter(hf, root / "a3", seed=3, r=5)
    # deltas of a fine-tune's size (a1's are larger than the weights they change)
    make_peft_adapter(hf, root / "a4", seed=4, r=4, alpha=0.2, target_modules=ATTENTION_AND_HEAD + ["w1", "w2", "w3"])
    return root


def fp8_holders(model):
    """{name: (fp8 weight, scale)} of every module that holds FP8 weights."""
    return {name: (m.weight, m.weight_scale) for name, m in model.named_modules()
            if getattr(m, "weight_scale", None) is not None}


def assert_dequantizes_to(fp8_model, float_model) -> None:
    """Every FP8 weight times its scales is exactly the float model's weight; every other tensor is equal."""
    holders = fp8_holders(fp8_model)
    assert holders and all(w.dtype == FP8 for w, _ in holders.values())
    float_state = float_model.state_dict()
    for name, (weight, scale) in holders.items():
        want = float_state[f"{name}.weight"] if f"{name}.weight" in float_state else float_state[name]
        assert torch.equal(dequantize(weight, scale, want.dtype), want), name
    for name, tensor in fp8_model.state_dict().items():
        if name in float_state and tensor.dtype != FP8:
            assert torch.equal(tensor, float_state[name]), name


@pytest.mark.parametrize("moe", sorted(MOE_CLASSES))
def test_a_float_checkpoint_quantized_at_load_is_the_float_model_of_its_fp8_values(checkpoints, moe):
    ours = load(checkpoints / "original", fp8=True, **MOE_CLASSES[moe])
    want = load(checkpoints / "requantized", fp8=False, **MOE_CLASSES[moe])
    assert_dequantizes_to(ours, want)
    original = paged_logits(load(checkpoints / "original", fp8=False), SEQUENCES, PROMPT_LENS, block_size=4)
    for got, expected, float_logits in zip(paged_logits(ours, SEQUENCES, PROMPT_LENS, block_size=4),
                                           paged_logits(want, SEQUENCES, PROMPT_LENS, block_size=4), original):
        assert relative_error(got, expected) <= 1e-5
        assert relative_error(got, float_logits) > 1e-3  # the weights really are the FP8 values


@pytest.mark.parametrize("moe", sorted(MOE_CLASSES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_fp8_checkpoint_served_in_fp8_equals_it_dequantized_on_load(checkpoints, layout, moe):
    ours = load(checkpoints / layout, fp8=True, **MOE_CLASSES[moe])
    want = load(checkpoints / layout, fp8=False, **MOE_CLASSES[moe])
    assert_dequantizes_to(ours, want)
    static = layout != "compressed_tensors_channel"  # the layouts with input scales keep them (as one per matmul)
    qkv = ours.model.layers[0].self_attn.query_key_value.base
    assert (qkv.input_scale is not None) == static
    for got, expected in zip(paged_logits(ours, SEQUENCES, PROMPT_LENS, block_size=4),
                             paged_logits(want, SEQUENCES, PROMPT_LENS, block_size=4)):
        assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("moe", sorted(MOE_CLASSES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS) + ["original"])
def test_tensor_parallel_fp8_shards_carry_the_scales_of_their_rows(checkpoints, layout, moe, rank):
    """Each rank's FP8 weights times their scales are exactly that rank's dequantized shards: per-channel scales
    sliced with column-parallel rows and kept whole beside row-parallel columns, per-tensor ones repeated.
    A float checkpoint's shards are quantized per rank: column-parallel rows as on one rank, row-parallel
    columns with scales of their own (compared with the shard quantized alone)."""
    group = FakeGroup(rank, 2)
    ours = load(checkpoints / layout, fp8=True, group=group, **MOE_CLASSES[moe])
    if layout != "original":
        assert_dequantizes_to(ours, load(checkpoints / layout, fp8=False, group=group, **MOE_CLASSES[moe]))
        return
    float_model = load(checkpoints / "original", fp8=False, group=group, **MOE_CLASSES[moe]).state_dict()
    for name, (weight, scale) in fp8_holders(ours).items():
        shard = float_model[f"{name}.weight"] if f"{name}.weight" in float_model else float_model[name]
        want = quantize_weight(shard)
        assert torch.equal(weight.float(), want.weight.float()) and torch.equal(scale, want.weight_scale), name


def test_lora_on_an_fp8_base_in_one_mixed_batch(checkpoints):
    """Attention + lm_head LoRA, router + expert LoRA (PEFT's fused layout) and per-expert LoRA, with a
    base-model request, over FP8 weights: the float model of the same FP8 values with the same adapters."""
    ours, want = load(checkpoints / "original", fp8=True), load(checkpoints / "requantized", fp8=False)
    stores = [store_for(ours), store_for(want)]
    for store in stores:
        for index in (1, 2, 3):
            store.load(index, checkpoints / f"a{index}")
    indices = [0, 1, 2, 3]
    sequences, prompts = SEQUENCES + [list(range(10, 22))], PROMPT_LENS + [6]
    got = paged_logits(ours, sequences, prompts, block_size=4, adapters=stores[0], adapter_indices=indices)
    expected = paged_logits(want, sequences, prompts, block_size=4, adapters=stores[1], adapter_indices=indices)
    base = paged_logits(ours, sequences, prompts, block_size=4)
    for i, (g, w) in enumerate(zip(got, expected)):
        assert relative_error(g, w) <= 1e-5
        assert (relative_error(g, base[i]) > 1e-2) == (indices[i] != 0)


@pytest.mark.parametrize("index, bound", [(4, 0.06), (3, 0.15)])
def test_an_adapter_merged_into_fp8_weights_gives_its_outputs(checkpoints, index, bound):
    """Merging requantizes the rows it changes: the merged model answers as the adapter does, up to one more FP8
    rounding of the merged rows (quantizing the float model itself moves these logits by about 0.03), far
    closer than the base model does. Measured here: a4 (attention, lm_head and experts; deltas of a fine-tune's
    size) 0.032-0.040 against 0.56-0.76 for the base; a3 (per-expert, deltas larger than the weights) 0.07-0.11
    against 1.4."""
    model = load(checkpoints / "original", fp8=True)
    store = store_for(model)
    store.load(index, checkpoints / f"a{index}")
    want = paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4, adapters=store, adapter_indices=[index] * 3)
    before = paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4)
    merge_into(model, store.offload(index))
    got = paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4)
    for g, w, b in zip(got, want, before):
        assert relative_error(g, w) <= bound and relative_error(g, w) < relative_error(b, w) / 5
    assert all(w.dtype == FP8 for w, _ in fp8_holders(model).values())


def test_get_model_quantize_fp8_serves_a_float_checkpoint_in_fp8(checkpoints, tmp_path, monkeypatch):
    for variable in ("LORAX_FP8_BACKEND", "LORAX_MOE_BACKEND"):
        monkeypatch.delenv(variable, raising=False)
    directory = tmp_path / "m"
    shutil.copytree(checkpoints / "original", directory)
    add_tokenizer(directory)
    served = get_model(str(directory), quantize="fp8", kv_cache_bytes=KV)
    model = served.model
    layer = model.model.layers[0]
    assert layer.self_attn.query_key_value.base.weight.dtype == FP8 and layer.moe.expert_w2.dtype == FP8
    assert layer.moe.gate.dtype == model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert CHOSEN["fp8"] == "dequantize" and CHOSEN["moe"] == "reference"
    want = load(checkpoints / "requantized", fp8=False)
    for got, expected in zip(paged_logits(model, SEQUENCES, PROMPT_LENS, block_size=4),
                             paged_logits(want, SEQUENCES, PROMPT_LENS, block_size=4)):
        assert relative_error(got, expected) <= 1e-5
