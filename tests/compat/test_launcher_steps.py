"""The launcher's `download-weights` step (launcher/src/main.rs:1166-1260), which must exit 0 before the
launcher starts any shard. (The stubs' wire format is checked against upstream in tests/server/test_wire_format.py.)"""

import subprocess
import sys

from tests.compat.launcher import MODEL_DIR, download_env, download_weights_argv


def test_launcher_download_weights_exits_0(tmp_path):
    """`lorax-server download-weights MODEL_ID --extension .safetensors --logger-level INFO --json-output
    --source hub --adapter-source hub` runs before any shard; the launcher stops unless it exits 0 (the weights
    are already local here)."""
    env = download_env()
    proc = subprocess.run([sys.executable, "-m", "lorax_server.cli"] + download_weights_argv(MODEL_DIR), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
