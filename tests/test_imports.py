"""The module imports with torch and safetensors alone: the GPU accelerators are optional."""

import subprocess
import sys

BLOCK_GPU_PACKAGES = """
import sys
for name in ("flash_attn", "flash_attn_2_cuda", "megablocks", "stk", "dropout_layer_norm", "vllm", "flashinfer"):
    sys.modules[name] = None  # any import of these now raises ImportError
import lorax_server.models.custom_modeling.flash_mixtral_modeling as m
from lorax_server.models.flash_mixtral import FlashMixtral
from lorax_server.utils.weights import Weights
from lorax_server.utils.attention.common import Seqlen
from lorax_server.utils.dist import FakeGroup
from lorax_server.adapters import AdapterBatchData
assert (m.ATTN_Q_PROJ, m.ATTN_K_PROJ, m.ATTN_V_PROJ, m.ATTN_O_PROJ) == (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
print("transformers" in sys.modules)
"""


def test_import_without_gpu_packages():
    result = subprocess.run([sys.executable, "-c", BLOCK_GPU_PACKAGES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # The modeling module itself does not even need transformers (only the tokenizer does).
    assert result.stdout.strip() == "False"


# Every public name of upstream's flash_mixtral_modeling.py (predibase/lorax @ a7394ba), plus LM_HEAD.
UPSTREAM_NAMES = ("MixtralConfig", "MixtralRMSNorm", "MixtralAttention", "BlockSparseMoE", "DenseMoE", "MixtralLayer",
                  "MixtralModel", "FlashMixtralForCausalLM", "ATTN_Q_PROJ", "ATTN_K_PROJ", "ATTN_V_PROJ",
                  "ATTN_O_PROJ", "MOE_W1", "MOE_W2", "MOE_W3", "LM_HEAD")


def test_upstream_public_names_are_importable():
    import lorax_server.models.custom_modeling.flash_mixtral_modeling as m

    assert [name for name in UPSTREAM_NAMES if not hasattr(m, name)] == []


def test_mixtral_rms_norm_takes_upstreams_constructor():
    import torch

    from lorax_server.models.custom_modeling.flash_mixtral_modeling import MixtralRMSNorm

    class OneTensor:
        def get_tensor(self, name, shape=None):
            assert name == "model.norm.weight"
            return torch.full((8,), 2.0)

    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    normed, summed = MixtralRMSNorm("model.norm", OneTensor(), eps=1e-6)(x, residual)
    want = 2.0 * (x + residual) * torch.rsqrt((x + residual).pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, want)
