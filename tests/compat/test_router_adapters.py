"""LoRAX router compatibility, scenario (c): adapter cycling with `--max-active-adapters 1` (a router option; the
shard is started with the launcher's exact command line). With one active slot the router's queue state
(router/src/queue.rs:338-451) offloads an idle adapter whenever another one waits, so every switch between base,
zen and shout is an OffloadAdapter of the old one and a LoadAdapter of the new one (loader.rs:175-263), and each
adapter is downloaded once, on first use (scheduler.rs:252-265, queue.rs:193-221)."""

from __future__ import annotations

import pytest

from tests.compat.conftest import SHOUT, ZEN, describe_failure, launch_shard, req, rpc_errors, start_router
from tests.compat.router import BASE_MODEL_ADAPTER_ID, InferError

P1, P2, P4 = "The for statement", "Beautiful is", "Explicit is"


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    yield from launch_shard(tmp_path_factory, "cycling")


@pytest.fixture(scope="module")
def router(shard):
    r = start_router(shard, max_active_adapters=1)
    yield r
    r.close()


def run(router, shard, requests):
    handles = router.submit_all(requests)
    out = []
    for request, h in zip(requests, handles):
        try:
            out.append(h.result(60))
        except (InferError, TimeoutError) as e:
            pytest.fail(f"{request.parameters.adapter_id or 'base'} {request.inputs!r} failed: {e}\n"
                        f"{describe_failure(router, shard)}")
    return out


def adapter_calls(router):
    calls = []
    for r in router.log.snapshot():
        if r.method in ("DownloadAdapter", "LoadAdapter", "OffloadAdapter"):
            ids = ",".join(r.request.adapter_parameters.adapter_ids)
            name = {ZEN: "zen", SHOUT: "shout", BASE_MODEL_ADAPTER_ID: "base"}.get(ids, ids)
            calls.append((r.method, name, getattr(r.request, "adapter_index", None), r.error))
    return calls


def test_c_adapter_cycling_with_one_active_adapter(shard, router):
    z1, = run(router, shard, [req(P2, ZEN, 20)])
    s1, b1 = run(router, shard, [req(P4, SHOUT, 16), req(P1, None, 16)])
    z2, b2 = run(router, shard, [req(P2, ZEN, 20), req(P1, None, 16)])
    s2, = run(router, shard, [req(P4, SHOUT, 16)])
    calls = adapter_calls(router)
    assert not rpc_errors(router), f"{rpc_errors(router)}\n{calls}"
    downloads = [c[1] for c in calls if c[0] == "DownloadAdapter"]
    assert sorted(downloads) == ["base", "shout", "zen"], calls  # each once, on first use
    loads = [c[1] for c in calls if c[0] == "LoadAdapter"]
    offloads = [c[1] for c in calls if c[0] == "OffloadAdapter"]
    # The scenario really cycled: zen and shout were loaded twice, each offloaded in between
    assert loads.count("zen") >= 2 and loads.count("shout") >= 2 and offloads.count("zen") >= 1, calls
    assert offloads.count("base") >= 1, calls  # upstream answers offloaded=false for the base model, no error
    # After an offload and a reload an adapter gives the same greedy tokens
    assert z1.token_ids == z2.token_ids, (z1.text, z2.text)
    assert s1.token_ids == s2.token_ids, (s1.text, s2.text)
    assert b1.token_ids == b2.token_ids, (b1.text, b2.text)
    # ... and it is applied: zen's output for P2 is not the base model's
    base_p2, = run(router, shard, [req(P2, None, 20)])
    assert base_p2.token_ids != z1.token_ids, "zen output equals the base model output after reloading"
