"""A real gRPC server on a unix socket, serving the embedded tiny Mixtral in fp32, per test module."""

import pytest
import torch
import transformers

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.client import ShardClient
from lorax_server.models import get_model
from lorax_server.server import start_server
from tests.adapters.peft_adapters import make_peft_adapter

KV_CACHE_BYTES = 4 << 20  # 4 MiB: 128 blocks of 16 tokens for this model, so "cache full" is reachable


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, hf_model):
    """Two PEFT adapters on the embedded model (directory, PEFT model)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "attn": (root / "attn", make_peft_adapter(hf_model, root / "attn", seed=1, r=4,
                                                  target_modules=["q_proj", "v_proj", "o_proj", "lm_head"])),
        "experts": (root / "experts", make_peft_adapter(hf_model, root / "experts", seed=2, r=8,
                                                        target_modules=["w1", "w2", "w3", "k_proj"])),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, engine) for a server that lives as long as the test module."""
    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=KV_CACHE_BYTES)
    socket = str(tmp_path_factory.mktemp("uds") / "lorax")
    server, _ = start_server(model, socket)
    client = ShardClient(f"unix://{socket}-0")
    client.wait_ready()
    yield client, model
    client.close()
    server.stop(grace=None)


def hf_greedy(hf_model, tokenizer, prompt: str, max_new_tokens: int):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()
