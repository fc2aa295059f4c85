"""`lorax-server generate` on the embedded tiny Mixtral, against transformers' greedy generate."""

import subprocess
import sys

import torch
import transformers

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models import get_model
from lorax_server.utils.tokens import SamplingParams

PROMPTS = ["The for statement", "A list is", "Exceptions are raised when"]


def test_greedy_generation_equals_transformers():
    ours = get_model(str(DEFAULT_MODEL_DIR), dtype="float32")
    assert ours.dtype == torch.float32
    results = ours.generate(PROMPTS, max_new_tokens=12)
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    for prompt, result in zip(PROMPTS, results):
        ids = ours.tokenizer(prompt, return_tensors="pt")["input_ids"]
        want = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert result.generated_ids == want[:len(result.generated_ids)]
    assert ours.cache.all_free  # every block came back


def test_sampling_is_reproducible_with_a_seed():
    ours = get_model(str(DEFAULT_MODEL_DIR), dtype="float32")
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    first = ours.generate(PROMPTS[:2], 10, params)
    again = ours.generate(PROMPTS[:2], 10, params)
    assert [r.generated_ids for r in first] == [r.generated_ids for r in again]


def test_generate_command_prints_text():
    result = subprocess.run(
        [sys.executable, "-m", "lorax_server.cli", "generate", "--prompt", "A list is", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "A list is" in result.stdout and "tokens/s" in result.stdout


def test_merging_an_embedded_adapter_into_the_engine(tmp_path):
    ours = get_model(str(DEFAULT_MODEL_DIR), dtype="float32")
    ours.adapters.load(1, DEFAULT_MODEL_DIR.parent / "adapters" / "zen")
    with_adapter = [r.generated_ids for r in ours.generate(PROMPTS, 10, adapter_indices=[1] * len(PROMPTS))]
    ours.merge_adapter(1)
    assert 1 not in ours.adapters.loaded
    assert [r.generated_ids for r in ours.generate(PROMPTS, 10)] == with_adapter
