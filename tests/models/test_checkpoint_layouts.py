"""Checkpoint layouts and directories: transformers 5's fused experts, tokenizers, stop ids, and the
checks that refuse a directory (config values, unused tensors) before anything is served."""

import json
import logging
import shutil
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models import get_model
from lorax_server.models import checkpoint
from lorax_server.models.custom_modeling.flash_mixtral_modeling import DenseMoE, ExpertParallelMoE, MixtralConfig
from lorax_server.utils.dist import FakeGroup
from lorax_server.utils.weights import CheckpointError, Weights
from tests.tiny_mixtral import TINY, load_ours, paged_logits, reference_logits, relative_error, save_tiny_mixtral

SEQUENCES = [list(range(3, 20)), list(range(50, 58))]
PROMPT_LENS = [11, 3]
MOE_CLASSES = {"sparse": {}, "dense": {"moe_cls": DenseMoE}, "expert_parallel": {"moe_cls": ExpertParallelMoE}}
KV = 1 << 20  # bytes of KV cache for get_model: these models are tiny


def add_tokenizer(directory):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rewrite_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def no_data_reads(monkeypatch):
    """Makes any read of tensor data fail: a refusal raised with it in place came before the weights loaded."""
    def refuse(self, name, index=()):
        raise AssertionError(f"weights were read ({name}) before the refusal")

    monkeypatch.setattr(Weights, "_read", refuse)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One tiny model written twice by transformers: its original layout and its own fused one."""
    root = tmp_path_factory.mktemp("layouts")
    hf = save_tiny_mixtral(root / "original", vocab_size=97)
    hf.save_pretrained(root / "fused", save_original_format=False)
    return root, hf


# -- transformers 5's fused layout -------------------------------------------------------------------


def test_fused_layout_is_what_transformers_writes(layouts):
    root, _ = layouts
    names = set(load_file(root / "fused" / "model.safetensors"))
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.down_proj"} <= names
    assert not any("block_sparse_moe" in name for name in names)


def test_fused_layout_logits_match_transformers(layouts):
    root, _ = layouts
    hf = transformers.MixtralForCausalLM.from_pretrained(root / "fused").eval()  # transformers reading the same files
    ours = paged_logits(load_ours(root / "fused"), SEQUENCES, PROMPT_LENS, block_size=4)
    for got, tokens in zip(ours, SEQUENCES):
        want = reference_logits(hf, tokens)
        assert relative_error(got, want) <= 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("moe", sorted(MOE_CLASSES))
@pytest.mark.parametrize("rank", [0, 1])
def test_fused_layout_shards_equal_the_original_layouts(layouts, moe, rank):
    """Every parameter of a rank's shard, for each MoE class, is the one the original layout gives."""
    root, _ = layouts
    group = FakeGroup(rank, 2)
    fused = load_ours(root / "fused", group=group, **MOE_CLASSES[moe]).state_dict()
    original = load_ours(root / "original", group=group, **MOE_CLASSES[moe]).state_dict()
    assert fused.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(fused[name], tensor), name


def test_fused_layout_with_wrong_expert_shape_is_refused(layouts, tmp_path):
    root, _ = layouts
    shutil.copytree(root / "fused", tmp_path / "m")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    rewrite_tensors(tmp_path / "m", lambda t: t.__setitem__(name, t[name][:, :96].contiguous()))
    with pytest.raises(CheckpointError, match=rf"tensor {name}: expected shape \[4, 192, 64\], found \[4, 96, 64\]"):
        load_ours(tmp_path / "m")


def test_fused_layout_serves_through_get_model(layouts, tmp_path):
    root, hf = layouts
    shutil.copytree(root / "fused", tmp_path / "m")
    add_tokenizer(tmp_path / "m")
    model = get_model(str(tmp_path / "m"), dtype="float32", kv_cache_bytes=KV)
    assert model.model.model.layers[1].moe.expert_w13.shape == (4, 192, 64)


# -- tokenizers ---------------------------------------------------------------------------------------


def write_sentencepiece_tokenizer(directory):
    """A tiny BPE sentencepiece model, the only tokenizer file of the directory (as in many Mistral repos)."""
    import sentencepiece

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "tokenizer"),
                                             vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                             pad_id=-1, minloglevel=2)
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()


def test_sentencepiece_tokenizer_model_alone_loads_with_its_chat_template(tmp_path):
    save_tiny_mixtral(tmp_path)
    write_sentencepiece_tokenizer(tmp_path)
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "chat_template": template}))
    model = get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)
    ids = model.tokenizer("the lazy fox")["input_ids"]
    assert 0 < len(ids) and max(ids) < 60
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "the lazy fox"
    assert model.tokenizer.chat_template == template
    assert model.generate(["the quick fox"], max_new_tokens=3)[0].finish_reason in ("length", "eos")


def test_chat_template_file_is_carried(tmp_path):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    model = get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)
    assert model.tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_directory_without_tokenizer_is_refused_before_the_weights(tmp_path, no_data_reads):
    save_tiny_mixtral(tmp_path)
    with pytest.raises(CheckpointError, match="has no tokenizer: expected tokenizer.json, or a sentencepiece "
                                              "tokenizer.model"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)
    (tmp_path / "model.safetensors").unlink()  # no weights at all: the tokenizer is still what is refused
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


def test_broken_tokenizer_json_is_refused_naming_the_directory(tmp_path, no_data_reads):
    save_tiny_mixtral(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"the tokenizer in .* \(tokenizer.json\) does not load"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


# -- stop ids -----------------------------------------------------------------------------------------


def test_generation_config_eos_ids_stop_generation(tmp_path):
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m")
    model = get_model(str(tmp_path / "m"), dtype="float32", kv_cache_bytes=KV)
    assert model.eos_token_ids == [2]
    first = model.generate(["The for statement"], max_new_tokens=4)[0]
    assert first.finish_reason == "length"
    token = first.generated_ids[1]  # the second token: a stop there ends generation after two
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [token, 2]}))
    model = get_model(str(tmp_path / "m"), dtype="float32", kv_cache_bytes=KV)
    assert model.eos_token_ids == [2] + ([token] if token != 2 else [])
    stopped = model.generate(["The for statement"], max_new_tokens=4)[0]
    assert stopped.finish_reason == "eos" and stopped.generated_ids == first.generated_ids[:2]


@pytest.mark.parametrize("config_eos, generation_eos, expected", [
    (2, None, [2]), ([2, 7], 7, [2, 7]), (2, [32000, 2], [2, 32000]), (None, 5, [5]), (None, None, []),
])
def test_eos_ids_are_the_union_of_both_files(tmp_path, config_eos, generation_eos, expected):
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    assert checkpoint.eos_token_ids(tmp_path, config_eos) == expected


def test_bad_eos_ids_are_refused(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(CheckpointError, match=r"generation_config.json eos_token_id must be a token id or a list of "
                                              r"them, got \['</s>'\]"):
        checkpoint.eos_token_ids(tmp_path, 2)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        checkpoint.eos_token_ids(tmp_path, 2)


# -- config values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_theta must be a positive number, got 0.0"),
    ({"rope_parameters": None, "rope_theta": -1}, "rope_theta must be a positive number, got -1"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0}},
     "rope scaling factor must be a positive number, got 0"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn' needs a scaling 'factor'"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 must be between 1 and num_local_experts 4"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"head_dim": None, "hidden_size": 66}, "hidden_size 66 is not divisible by num_attention_heads 4, and config"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
    ({"intermediate_size": 96.0}, "intermediate_size must be a positive integer, got 96.0"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number, got nan"),
    ({"sliding_window": 0}, "sliding_window must be a positive number of tokens or null, got 0"),
])
def test_nonsensical_config_values_are_refused_before_the_weights(tmp_path, no_data_reads, change, message):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


def test_real_configs_still_pass_validation():
    MixtralConfig(**TINY)
    MixtralConfig.from_dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))  # head_dim null


# -- tensors the model would never read ----------------------------------------------------------------


def test_config_with_fewer_layers_than_the_checkpoint_is_refused_before_the_weights(tmp_path, no_data_reads):
    save_tiny_mixtral(tmp_path, num_hidden_layers=3)
    add_tokenizer(tmp_path)
    edit_config(tmp_path, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="the checkpoint holds layers 0..2, but config.json's num_hidden_layers "
                                              "is 2: config.json does not describe these weights"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)
    edit_config(tmp_path, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match="holds layers 0..2, but config.json's num_hidden_layers is 4"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


def test_config_with_fewer_experts_than_the_checkpoint_is_refused(tmp_path, no_data_reads):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    edit_config(tmp_path, num_local_experts=3)
    with pytest.raises(CheckpointError, match="holds experts 0..3, but config.json's num_local_experts is 3"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


def test_stray_tensor_is_refused_by_name(tmp_path):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match="the checkpoint has 1 tensor this model never reads: "
                                              "model.layers.0.self_attn.q_proj.bias; config.json does not describe"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


def test_untied_head_under_a_tied_config_is_refused(tmp_path):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="ties lm_head to embed_tokens, yet the checkpoint stores its own "
                                              "lm_head.weight"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


def test_recomputed_rotary_buffers_are_not_refused(tmp_path):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_integer_weights_without_quantization_config_are_refused_before_the_weights(tmp_path, no_data_reads, dtype):
    save_tiny_mixtral(tmp_path)
    add_tokenizer(tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    rewrite_tensors(tmp_path, lambda t: t.__setitem__(name, t[name].to(dtype)))
    stored = {torch.int8: "I8", torch.int32: "I32", torch.bool: "BOOL"}[dtype]
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored as {stored}, not as floating-point numbers: "
                                              f"integer weights are quantized"):
        get_model(str(tmp_path), dtype="float32", kv_cache_bytes=KV)


# -- progress ------------------------------------------------------------------------------------------


@pytest.fixture
def sharded_files(tmp_path):
    hf = save_tiny_mixtral(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
    hf.save_pretrained(tmp_path / "m", max_shard_size="150KB")
    add_tokenizer(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    return tmp_path / "m"


def test_a_log_line_per_file_when_stderr_is_not_a_terminal(sharded_files, caplog):
    files = sorted(sharded_files.glob("*.safetensors"))
    with caplog.at_level(logging.INFO, logger="lorax_server.models.checkpoint"):
        get_model(str(sharded_files), dtype="float32", kv_cache_bytes=KV)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading weights: file")]
    assert sorted(lines) == sorted(f"loading weights: file {i} of {len(files)}, {f.name}"
                                   for i, f in enumerate(files, 1)) or len(lines) == len(files)
    assert any(r.getMessage().startswith("weights loaded in") for r in caplog.records)


def test_a_progress_bar_on_a_terminal(sharded_files, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    get_model(str(sharded_files), dtype="float32", kv_cache_bytes=KV)
    err = capsys.readouterr().err
    count = len(json.loads((sharded_files / "model.safetensors.index.json").read_text())["weight_map"])
    assert "loading weights: 100%" in err and f"{count}/{count}" in err


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]),
     r"model.safetensors is not a readable safetensors file \(SafetensorError"),
    (lambda d: (d / "config.json").write_text("{bad"), r"config.json is not a readable JSON file"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"config.json holds a JSON list, not an object"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": ["x"]}}'),
     r"model.safetensors.index.json: every 'weight_map' value must be a file name"),
    (lambda d: (d / "model.safetensors.index.json").write_text("{"), "model.safetensors.index.json is not a readable"),
])
def test_unreadable_checkpoint_files_are_named(tmp_path, damage, message):
    """A file cut short, or JSON that does not parse or has the wrong shape: a CheckpointError naming the file
    (the CLI prints it as one line), not the parser's own error."""
    directory = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, directory)
    damage(directory)
    with pytest.raises(CheckpointError, match=message):
        get_model(str(directory), dtype="float32", kv_cache_bytes=4 << 20)
