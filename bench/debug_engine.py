"""Debug helper for the device: eager and CUDA-graph generation on the embedded model (fp32)."""

import os
import sys
import traceback

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.models import get_model

PROMPTS = ["The for statement", "A list is", "Exceptions are", "def f(x):", "Beautiful is"]

model = get_model(str(DEFAULT_MODEL_DIR), dtype=sys.argv[1], kv_cache_bytes=64 << 20)
if os.getenv("LORAX_CUDA_GRAPHS") == "0":
    print("graphs off:", model.graphs)
try:
    print([r.generated_ids[:8] for r in model.generate(PROMPTS, 20)])
except Exception:
    traceback.print_exc()
