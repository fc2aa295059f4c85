"""Shared helpers for the router-compatibility modules: each module starts ONE shard exactly as LoRAX's launcher does
(tests/compat/launcher.py) and drives it with the router emulation (tests/compat/router.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional

from lorax_server.cli import DEFAULT_MODEL_DIR
from tests.compat.launcher import MODEL_DIR, ShardProcess
from tests.compat.router import GenerateParameters, GenerateRequest, Router, RouterArgs

# The embedded PEFT adapters, named by their local directory with adapter source "hub" (the launcher's default,
# launcher/src/main.rs:316): upstream resolves a hub id that is an existing local directory to that directory.
ADAPTERS_DIR = Path(DEFAULT_MODEL_DIR).parent / "adapters"
ZEN = str(ADAPTERS_DIR / "zen")
SHOUT = str(ADAPTERS_DIR / "shout")


def launch_shard(tmp_path_factory, name: str, **kwargs):
    """Generator body for a module-scoped shard fixture."""
    shard = ShardProcess(tmp_path_factory.mktemp(name), **kwargs).start()
    try:
        shard.wait_ready()
        yield shard
    finally:
        shard.stop()


def start_router(shard: ShardProcess, **router_overrides) -> Router:
    router = Router(shard.socket_path, MODEL_DIR, RouterArgs.launcher_defaults(MODEL_DIR, **router_overrides))
    try:
        router.start()
    except BaseException as e:
        router.close()
        raise RuntimeError(f"router start-up failed: {type(e).__name__}: {e}\n--- shard log tail ---\n"
                           f"{shard.log_tail(25)}") from e
    return router


def req(inputs: str, adapter_id: Optional[str] = None, max_new_tokens: Optional[int] = 16, **params) -> GenerateRequest:
    return GenerateRequest(inputs, GenerateParameters(adapter_id=adapter_id, max_new_tokens=max_new_tokens, **params))


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition", router: Router = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if router is not None and router.aborted:
            raise AssertionError(f"router aborted while waiting for {what}: {router.aborted}")
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}" + (f"; router: {router.describe()}" if router else ""))


def records_since(router: Router, mark: int, method: Optional[str] = None):
    recs = router.log.snapshot()[mark:]
    return [r for r in recs if method is None or r.method == method]


def rpc_errors(router: Router, mark: int = 0) -> List[str]:
    return [f"{r.method}: {r.error}" for r in records_since(router, mark) if r.error is not None]


def describe_failure(router: Router, shard: ShardProcess) -> str:
    return f"router: {router.describe()}\n--- shard log tail ---\n{shard.log_tail(20)}"
