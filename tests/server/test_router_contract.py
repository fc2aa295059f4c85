"""What LoRAX's router sends with its defaults, answered as upstream's shard answers it (../shared/LORAX_ROUTER.md).

Each call here is built the way the router builds it (router/client/src/client.rs for Warmup,
router/src/health.rs for the liveness probe, router/src/block_allocator.rs for blocks and slots,
router/src/scheduler.rs for the token budget); tests/compat drives a whole shard through the same.
"""

import json
import random
import shutil

import pytest

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.client import ShardClient, liveness_probe, make_request
from lorax_server.models import get_model
from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import start_server

U64_MAX = 2**64 - 1
POSITIONS = 1024  # the embedded model's max_position_embeddings
# Router defaults for a model with P positions (launcher/src/main.rs): max_input_length P-1, max_total_tokens P,
# max_batch_prefill_tokens P+49.
MAX_INPUT, MAX_TOTAL, MAX_PREFILL = POSITIONS - 1, POSITIONS, POSITIONS + 49


def serve(model, tmp_path_factory):
    socket = str(tmp_path_factory.mktemp("uds") / "lorax")
    server, _ = start_server(model, socket)
    client = ShardClient(f"unix://{socket}-0")
    client.wait_ready()
    return server, client


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """(client, engine): the embedded model with room for the router's warm-up batch (2 x 1023 tokens)."""
    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=6 << 20)
    server, client = serve(model, tmp_path_factory)
    yield client, model
    client.close()
    server.stop(grace=None)


@pytest.fixture(scope="module")
def windowed_shard(tmp_path_factory):
    """The embedded model with a sliding window: the router does not allocate blocks, our engine does."""
    directory = tmp_path_factory.mktemp("windowed") / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "sliding_window": 256}))
    model = get_model(str(directory), dtype="float32", kv_cache_bytes=8 << 20)
    server, client = serve(model, tmp_path_factory)
    yield client, model
    client.close()
    server.stop(grace=None)


def warmup_request() -> pb.WarmupRequest:
    """router/client/src/client.rs: requests while their truncates sum below max_prefill_tokens, ALL with id 0."""
    requests, tokens = [], 0
    while tokens < MAX_PREFILL:
        truncate = min(MAX_INPUT, MAX_PREFILL - tokens)
        params = pb.NextTokenChooserParameters(temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=False,
                                               seed=0, repetition_penalty=1.2, frequency_penalty=0.5,
                                               presence_penalty=0.5, watermark=True)
        stopping = pb.StoppingCriteriaParameters(max_new_tokens=MAX_TOTAL - truncate, ignore_eos_token=False)
        requests.append(pb.Request(id=0, inputs="_test " * MAX_INPUT, truncate=truncate, parameters=params,
                                   stopping_parameters=stopping, prefill_logprobs=True, adapter_index=0))
        tokens += truncate
    batch = pb.Batch(id=0, requests=requests, size=len(requests), max_tokens=0)
    return pb.WarmupRequest(batch=batch, max_input_length=MAX_INPUT, max_prefill_tokens=MAX_PREFILL,
                            max_new_tokens=MAX_TOTAL - MAX_INPUT)


def router_blocks(first_block: int, tokens: int, block_size: int):
    """router/src/block_allocator.rs (SimpleAllocator): blocks for `tokens`, slots in block order."""
    count = -(-tokens // block_size)
    blocks = list(range(first_block, first_block + count))
    return blocks, [b * block_size + o for b in blocks for o in range(block_size)][:tokens]


def run(client, response):
    ids = {}
    while True:
        for g in response.generations:
            ids.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        if not response.HasField("batch"):
            return ids
        response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))


def test_start_up_sequence_and_warmup_as_the_router_sends_them(shard):
    client, model = shard
    client.stub.ServiceDiscovery(pb.ServiceDiscoveryRequest())
    client.stub.ClearCache(pb.ClearCacheRequest())
    info = client.stub.Info(pb.InfoRequest())
    assert info.requires_block_allocator and not info.requires_padding and info.block_size == 16
    answer = client.stub.Warmup(warmup_request()).max_supported_total_tokens
    # The router's allocator then hands out blocks 1 .. answer/16 - 1; it exits unless the answer covers its limits.
    assert answer == model.cache.num_blocks * model.cache.block_size and answer >= max(MAX_TOTAL, MAX_PREFILL)
    assert model.cache.all_free and not model.batches
    startup = make_request(1, "Who?", max_new_tokens=1, truncate=MAX_INPUT)  # router/src/main.rs: /startup
    assert len(run(client, client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[startup],
                                                                                  size=1))))[1]) == 1


def test_liveness_probe_on_block_0_while_a_batch_with_router_blocks_is_live(shard):
    client, model = shard
    bs = model.cache.block_size
    prompt = model.tokenizer("The for statement")["input_ids"]
    alone = run(client, client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=20, requests=[
        make_request(5, ids=prompt, max_new_tokens=12, ignore_eos_token=True)], size=1))))[5]
    blocks, slots = router_blocks(1, len(prompt) + 12 - 1, bs)  # input + max_new - 1 tokens, as the router counts
    live = make_request(5, ids=prompt, max_new_tokens=12, ignore_eos_token=True, blocks=blocks, slots=slots,
                        truncate=MAX_INPUT)
    response = client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=21, requests=[live], size=1)))
    generated = list(response.generations[0].next_tokens.ids)
    assert response.batch.max_tokens == len(blocks) * bs  # upstream's CachedBatch.max_tokens: whole blocks
    probe = client.stub.Prefill(liveness_probe(bs))
    assert probe.generations[0].HasField("generated_text") and not probe.HasField("batch")
    assert client.stub.Prefill(liveness_probe(bs)).generations[0].request_id == U64_MAX  # and again
    generated += run(client, client.stub.Decode(pb.DecodeRequest(batches=[response.batch])))[5]
    assert generated == alone
    assert model.cache.all_free and 0 not in model.cache.free_blocks  # block 0 stays the probe's


def test_router_blocks_short_of_the_request_are_refused_by_name(shard):
    client, model = shard
    blocks, slots = router_blocks(1, 16, model.cache.block_size)
    request = make_request(3, ids=list(range(5, 15)), max_new_tokens=8, blocks=blocks, slots=slots)
    response = client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=30, requests=[
        request, make_request(4, ids=[7, 8, 9], max_new_tokens=1)], size=2)))
    by_id = {g.request_id: g.generated_text.text for g in response.generations}
    assert "request 3: 1 blocks cannot hold its 17 tokens" in by_id[3] and not by_id[4].startswith("[error]")
    assert model.cache.all_free and not model.batches


def test_windowed_model_admits_every_batch_the_routers_budget_allows(windowed_shard):
    """Without the router's allocator, the router budgets with CachedBatch.max_tokens and its own count of a
    new batch (router/src/scheduler.rs: n * longest prompt + sum of max_new_tokens): every batch it would
    form must be admitted, whatever the rounding to blocks."""
    client, model = windowed_shard
    info = client.stub.Info(pb.InfoRequest())
    assert not info.requires_block_allocator and info.window_size == 256
    budget = client.stub.Warmup(warmup_request()).max_supported_total_tokens
    rng, running, next_id = random.Random(0), None, 0
    for step in range(12):
        token_budget = budget - (running.max_tokens if running else 0)
        requests, longest, new_tokens = [], 0, 0
        while True:
            # The worst rounding: prompt + max_new - 1 cache tokens one past a whole block, shortest prompts.
            total = model.cache.block_size * rng.randint(2, 3) + 2
            prompt = rng.randint(model.cache.block_size - 1, model.cache.block_size + 2)
            max_new = total - prompt
            n, top = len(requests) + 1, max(longest, prompt)
            if n * top > MAX_PREFILL or n * top + new_tokens + max_new > token_budget:
                break
            requests.append(make_request(next_id, ids=[rng.randrange(3, 2000) for _ in range(prompt)],
                                         max_new_tokens=max_new, ignore_eos_token=True, truncate=MAX_INPUT))
            longest, new_tokens, next_id = top, new_tokens + max_new, next_id + 1
        if requests:
            new = client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=100 + step, requests=requests,
                                                                       size=len(requests))))
            batches = [b for b in (running, new.batch if new.HasField("batch") else None) if b is not None]
        else:
            batches = [running] if running is not None else []
        if not batches:
            continue
        response = client.stub.Decode(pb.DecodeRequest(batches=batches))
        for _ in range(rng.randint(0, 2)):
            if not response.HasField("batch"):
                break
            response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
        running = response.batch if response.HasField("batch") else None
    client.stub.ClearCache(pb.ClearCacheRequest())
    assert model.cache.all_free
