"""How LoRAX's launcher starts one shard (rank 0 of world size 1), from launcher/src/main.rs @ a7394ba.

Only the `serve` process is emulated here; `download-weights` (launcher/src/main.rs:1166-1260, run once before
serving) has its own test in test_wire_upstream.py so that its failure does not hide the serve scenarios.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from lorax_server.cli import DEFAULT_MODEL_DIR

MODEL_DIR = str(DEFAULT_MODEL_DIR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(model_id: str, uds_path: str, preloaded_adapter_ids: List[str] = (), source: str = "hub",
               adapter_source: str = "hub") -> List[str]:
    """launcher/src/main.rs:719-806 with the launcher's defaults: no --adapter-id, no --trust-remote-code, world
    size 1 (no --sharded), no --quantize, `--compile` because --eager is off (:754-757), no speculative tokens,
    one `--preloaded-adapter-ids ID` per preloaded adapter (:769-774), no --merge-adapter-weights, no
    --preloaded-adapter-source, --dtype, --revision, --otlp-endpoint or --embedding-dim."""
    args = ["serve", model_id, "--uds-path", uds_path, "--logger-level", "INFO", "--json-output",
            "--source", source, "--adapter-source", adapter_source]  # :719-731
    args.append("--compile")  # :754-757 `if !eager`
    for adapter_id in preloaded_adapter_ids:  # :769-774
        args += ["--preloaded-adapter-ids", adapter_id]
    return args


def download_weights_argv(model_id: str, source: str = "hub", adapter_source: str = "hub") -> List[str]:
    """launcher/src/main.rs:1174-1186."""
    return ["download-weights", model_id, "--extension", ".safetensors", "--logger-level", "INFO", "--json-output",
            "--source", source, "--adapter-source", adapter_source]


def launcher_env(rank: int, world_size: int, master_port: int, has_preloaded_adapters: bool,
                 prefix_caching: Optional[bool] = None, chunked_prefill: Optional[bool] = None) -> dict:
    """launcher/src/main.rs:809-903 with the launcher's defaults (the current environment is copied first, :809);
    `--prefix-caching` / `--chunked-prefill` when given (both unset by default, :522-530)."""
    env = dict(os.environ)
    # Not inherited here, so that each module's shard has exactly the switches its test asks for.
    env.pop("PREFIX_CACHING", None)
    env.pop("CHUNKED_PREFILL", None)
    if prefix_caching is not None:  # :843-846
        env["PREFIX_CACHING"] = "1" if prefix_caching else "0"
    if chunked_prefill is not None:  # :849-852
        env["CHUNKED_PREFILL"] = "1" if chunked_prefill else "0"
    env.update({
        "RANK": str(rank),  # :820
        "WORLD_SIZE": str(world_size),  # :821
        # :822 master_addr defaults to "localhost" (:561); 127.0.0.1 avoids IPv6 resolution surprises in CI
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),  # :823 (default 29500, :565; a free port here so modules never collide)
        "NCCL_ASYNC_ERROR_HANDLING": "1",  # :824
        "CUDA_MEMORY_FRACTION": "1",  # :826-830, default 1.0 (:587; Rust prints 1.0f32 as "1")
        # :833-841: 0 when adapters are preloaded, else --adapter-memory-fraction (default 0.1, :544-545)
        "ADAPTER_MEMORY_FRACTION": "0" if has_preloaded_adapters else "0.1",
        "LORAX_COMPILE_MAX_BATCH_SIZE": "128",  # :855-858 (default :362)
        "LORAX_COMPILE_MAX_RANK": "64",  # :860-863 (default :366)
        "LORAX_COMPILE_BATCH_SIZE": "32",  # :865-869 (default :370)
        "LORAX_SPECULATION_MAX_BATCH_SIZE": "32",  # :871-875 (default :379)
        "MEMORY_WIGGLE_ROOM": "0.9",  # :886-890 (default :653)
        "SAFETENSORS_FAST_GPU": "1",  # :893
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # :896
        "HF_HUB_ENABLE_HF_TRANSFER": os.environ.get("HF_HUB_ENABLE_HF_TRANSFER", "1"),  # :899-903
    })
    return env


def download_env() -> dict:
    """launcher/src/main.rs:1206-1223 (the current environment, progress bars off, hf_transfer on by default)."""
    env = dict(os.environ)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # :1216
    env["HF_HUB_ENABLE_HF_TRANSFER"] = os.environ.get("HF_HUB_ENABLE_HF_TRANSFER", "1")  # :1219-1223
    return env


class ShardProcess:
    """shard_manager (launcher/src/main.rs:660-1021) for one rank."""

    def __init__(self, tmp_dir: Path, preloaded_adapter_ids: List[str] = (), extra_args: List[str] = (),
                 model_id: str = MODEL_DIR, prefix_caching: Optional[bool] = None,
                 chunked_prefill: Optional[bool] = None):
        self.tmp_dir = Path(tmp_dir)
        self.uds_path = str(self.tmp_dir / "lorax-server")
        self.socket_path = f"{self.uds_path}-0"  # :711 `{uds_path}-{rank}`
        self.log_path = self.tmp_dir / "shard.log"
        self.master_port = free_port()
        # The exact launcher argv, plus `extra_args` (NOT launcher options; only the cache-pressure module uses one,
        # this project's --kv-cache-mib, and says so where it does).
        self.argv = [sys.executable, "-m", "lorax_server.cli"] + serve_argv(
            model_id, self.uds_path, list(preloaded_adapter_ids)) + list(extra_args)
        self.env = launcher_env(0, 1, self.master_port, bool(preloaded_adapter_ids), prefix_caching, chunked_prefill)
        self.proc: Optional[subprocess.Popen] = None
        self.started_at: Optional[float] = None
        self.ready_after: Optional[float] = None

    def start(self) -> "ShardProcess":
        if os.path.exists(self.socket_path):  # :713-716 "Clean previous runs"
            os.remove(self.socket_path)
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        # :942-948: stdout/stderr piped (here: to a log file), own process group
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     process_group=0, cwd=str(self.tmp_dir))
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float = 120.0) -> "ShardProcess":
        """:981-1020: the shard is ready when its socket file exists; a process that exits has failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:  # :986-999
                raise RuntimeError(f"shard exited with status {code} before it was ready "
                                   f"(argv: {' '.join(self.argv[1:])})\n--- shard log tail ---\n{self.log_tail()}")
            if os.path.exists(self.socket_path):  # :1011-1014
                self.ready_after = time.monotonic() - self.started_at
                return self
            time.sleep(0.1)  # :1019
        raise RuntimeError(f"shard not ready after {timeout:.0f}s\n--- shard log tail ---\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            # :1002-1007: on shutdown the shard manager kills the shard process (p.kill(), SIGKILL) and waits
            self.proc.kill()
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
