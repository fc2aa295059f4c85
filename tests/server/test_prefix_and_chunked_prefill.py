"""Prefix caching and chunked prefill over gRPC, as LoRAX's router sends them (../shared/LORAX_ROUTER.md):
`cache_len` with the blocks of an earlier request, `chunk_len` on a request's first Prefill, `cached_batch` on a
Prefill once Info says chunked_prefill (upstream's CHUNKED_PREFILL=1, which the launcher sets from
--chunked-prefill). Without the switch Info says no, and a Prefill with cached_batch is answered as before."""

import json
import shutil

import pytest

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.client import ShardClient, make_request
from lorax_server.models import get_model
from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import start_server

BS = 16
PROMPT = [(5 * i + 11) % 2000 + 5 for i in range(70)]


def served_model(tmp_path_factory, env, config=None):
    directory = DEFAULT_MODEL_DIR
    if config:
        directory = tmp_path_factory.mktemp("model") / "tiny_mixtral"
        shutil.copytree(DEFAULT_MODEL_DIR, directory)
        patched = {**json.loads((directory / "config.json").read_text()), **config}
        (directory / "config.json").write_text(json.dumps(patched))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        model = get_model(str(directory), dtype="float32", kv_cache_bytes=4 << 20)
    socket = str(tmp_path_factory.mktemp("uds") / "lorax")
    server, _ = start_server(model, socket)
    client = ShardClient(f"unix://{socket}-0")
    client.wait_ready()
    return server, client, model


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    server, client, model = served_model(tmp_path_factory, {"CHUNKED_PREFILL": "1", "PREFIX_CACHING": "1"})
    yield client, model
    client.close()
    server.stop(grace=None)


def routed(rid, ids, blocks, new=6, cache_len=0, chunk_len=None, **options):
    """A request as the router's block allocator sends it: its blocks and their slots (radix.rs:136-150)."""
    tokens = len(ids) + new - 1
    slots = [b * BS + i for b in blocks for i in range(BS)][:tokens]
    r = make_request(rid, ids=ids, max_new_tokens=new, ignore_eos_token=True, blocks=blocks, slots=slots, **options)
    r.cache_len = cache_len
    if chunk_len is not None:
        r.chunk_len = chunk_len
    return r


def fresh_blocks(first, ids, new=6, reuse=()):
    return list(reuse) + list(range(first, first + -(-(len(ids) + new - 1) // BS) - len(reuse)))


def prefill(client, batch_id, requests, cached=None):
    request = pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests)))
    if cached is not None:
        request.cached_batch.CopyFrom(cached)
    return client.stub.Prefill(request)


def finish(client, response, tokens):
    """Decodes to the end, collecting each request's tokens (and logprobs)."""
    while True:
        for g in response.generations:
            tokens.setdefault(g.request_id, []).extend(zip(g.next_tokens.ids, g.next_tokens.logprobs))
        if not response.HasField("batch"):
            return tokens
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))


def same(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-4)


def test_info_reports_chunked_prefill_only_when_switched_on_and_the_router_allocates(chunked, tmp_path_factory):
    client, _ = chunked
    assert client.stub.Info(pb.InfoRequest()).chunked_prefill is True
    assert client.stub.Info(pb.InfoRequest()).requires_block_allocator is True
    # A sliding window: the router does not allocate blocks, so it never sends chunk_len (scheduler.rs:348-368)
    server, windowed, _ = served_model(tmp_path_factory, {"CHUNKED_PREFILL": "1"}, {"sliding_window": 64})
    try:
        info = windowed.stub.Info(pb.InfoRequest())
        assert info.chunked_prefill is False and info.requires_block_allocator is False
    finally:
        windowed.close()
        server.stop(grace=None)


def test_a_prefix_hit_over_grpc_equals_a_full_prefill(chunked):
    client, model = chunked
    full = finish(client, prefill(client, 1, [routed(1, PROMPT, fresh_blocks(10, PROMPT))]), {})
    first = fresh_blocks(20, PROMPT)
    finish(client, prefill(client, 2, [routed(2, PROMPT, first)]), {})
    hit = finish(client, prefill(client, 3, [routed(3, PROMPT, fresh_blocks(40, PROMPT, reuse=first[:4]),
                                                    cache_len=64)]), {})
    same(hit[3], full[1])
    assert model.cache.all_free


def test_chunks_across_prefill_and_decode_calls(chunked):
    """The first Prefill runs 20 prompt tokens and answers the batch without a generation for it (its
    current_tokens are the next step's: a chunk of Warmup's max_prefill_tokens less one per other request);
    a Prefill with that batch as cached_batch adds a request and steps both; Decode calls run the rest. The
    tokens equal a one-piece prefill's."""
    client, model = chunked
    full = finish(client, prefill(client, 1, [routed(1, PROMPT, fresh_blocks(10, PROMPT))]), {})
    short = PROMPT[:9]
    alone = finish(client, prefill(client, 2, [routed(2, short, fresh_blocks(10, short))]), {})
    model.max_prefill_tokens = 24  # what Warmup sets from the router's max_batch_prefill_tokens

    response = prefill(client, 3, [routed(3, PROMPT, fresh_blocks(10, PROMPT), chunk_len=20)])
    assert list(response.generations) == []
    assert list(response.batch.request_ids) == [3] and response.batch.current_tokens == 24
    response = prefill(client, 4, [routed(4, short, fresh_blocks(30, short))], cached=response.batch)
    assert [g.request_id for g in response.generations] == [4]  # request 3 is still prefilling
    assert response.batch.id == 3 and list(response.batch.request_ids) == [3, 4]
    assert response.batch.current_tokens == 23 + 1  # the next chunk (24 less one) and request 4's token
    tokens = finish(client, response, {})
    same(tokens[3], full[1])
    same(tokens[4], alone[2])
    model.max_prefill_tokens = None
    assert model.cache.all_free and not model.batches
