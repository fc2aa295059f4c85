"""Batch bookkeeping through the gRPC service, with request ids that are not positions (907, 12, 3001, 5):
Prefill, Decode, FilterBatch (several in a row, in another order than the batch's), concatenation (Decode
of several batches, Prefill with a cached batch), ClearCache, and the CachedBatch fields the router reads
(id, request_ids in order, size, max_tokens = the blocks the batch holds x block size, current_tokens).

Greedy output is the oracle for "the right request got the right state": every request, in whatever
batch it ran, produces the tokens it produces alone.
"""

import pytest

from lorax_server.client import make_request
from lorax_server.pb import generate_pb2 as pb

PROMPTS = {907: "The for statement", 12: "A list is a mutable sequence of", 3001: "Exceptions", 5: "def f(x): return"}
NEW = {907: 18, 12: 9, 3001: 21, 5: 12}  # distinct lengths: requests finish at different steps


def request(rid: int) -> pb.Request:
    return make_request(rid, PROMPTS[rid], max_new_tokens=NEW[rid], ignore_eos_token=True)


class Run:
    """Drives the service like the router and records every request's tokens and finish."""

    def __init__(self, client):
        self.stub = client.stub
        self.tokens = {}
        self.finished = {}

    def record(self, response):
        for g in response.generations:
            assert g.request_id not in self.finished, f"request {g.request_id} generated after it finished"
            self.tokens.setdefault(g.request_id, []).extend(g.next_tokens.ids)
            if g.HasField("generated_text"):
                self.finished[g.request_id] = g.generated_text
        return response

    def prefill(self, batch_id, ids, cached=None):
        batch = pb.Batch(id=batch_id, requests=[request(i) for i in ids], size=len(ids))
        message = pb.PrefillRequest(batch=batch, cached_batch=cached) if cached else pb.PrefillRequest(batch=batch)
        return self.record(self.stub.Prefill(message))

    def decode(self, *batches):
        return self.record(self.stub.Decode(pb.DecodeRequest(batches=list(batches))))

    def filter(self, batch_id, ids):
        return self.stub.FilterBatch(pb.FilterBatchRequest(batch_id=batch_id, request_ids=ids)).batch

    def to_the_end(self, batch):
        while True:
            response = self.decode(batch)
            if not response.HasField("batch"):
                return
            batch = response.batch


def held_tokens(model) -> int:
    """Tokens of cache that live batches hold: blocks out of the free lists x block size."""
    cache = model.cache
    return (cache.num_blocks - len(cache.free_blocks) - len(cache.reserved_free)) * cache.block_size


@pytest.fixture(scope="module")
def prompt_len(served):
    _, model = served
    return {rid: len(model.tokenizer(text)["input_ids"]) for rid, text in PROMPTS.items()}


@pytest.fixture(scope="module")
def alone(served):
    """Each request's greedy tokens when it runs alone."""
    client, model = served
    out = {}
    for rid in PROMPTS:
        run = Run(client)
        response = run.prefill(10_000 + rid, [rid])
        run.to_the_end(response.batch)
        assert len(run.tokens[rid]) == NEW[rid] and run.finished[rid].finish_reason == pb.FINISH_REASON_LENGTH
        out[rid] = run.tokens[rid]
    assert model.cache.all_free and not model.batches
    return out


@pytest.fixture(autouse=True)
def clean_cache(served):
    _, model = served
    yield
    client, _ = served
    client.stub.ClearCache(pb.ClearCacheRequest())


def assert_fields(batch, batch_id, ids, current_tokens, model, in_order=True):
    """The CachedBatch fields. After a FilterBatch the order of request_ids is not pinned (upstream lists
    them in the filter's order, this shard in the batch's; the router matches generations by id)."""
    assert batch.id == batch_id
    assert (list(batch.request_ids) if in_order else sorted(batch.request_ids)) == (ids if in_order else sorted(ids))
    assert batch.size == len(ids)
    assert batch.current_tokens == current_tokens
    assert batch.max_tokens == held_tokens(model) and batch.max_tokens % model.cache.block_size == 0


def test_prefill_and_decode_report_the_batch_as_the_router_reads_it(served, prompt_len, alone):
    client, model = served
    run = Run(client)
    ids = [907, 12, 3001]
    response = run.prefill(70, ids)
    assert [g.request_id for g in response.generations] == ids
    assert [g.prefill_tokens_length for g in response.generations] == [prompt_len[i] for i in ids]
    assert_fields(response.batch, 70, ids, sum(prompt_len[i] + 1 for i in ids), model)
    held = response.batch.max_tokens
    for step in (2, 3):
        response = run.decode(response.batch)
        assert [g.request_id for g in response.generations] == ids
        assert_fields(response.batch, 70, ids, sum(prompt_len[i] + step for i in ids), model)
        assert response.batch.max_tokens == held  # every block was reserved at admission
    assert {i: run.tokens[i] for i in ids} == {i: alone[i][:3] for i in ids}
    client.stub.ClearCache(pb.ClearCacheRequest(id=70))
    assert model.cache.all_free and not model.batches


def test_several_filters_in_a_row_keep_requests_by_id(served, prompt_len, alone):
    client, model = served
    run = Run(client)
    response = run.prefill(71, [907, 12, 3001, 5])
    response = run.decode(response.batch)  # 2 tokens each
    held = held_tokens(model)

    kept = run.filter(71, [3001, 907, 5])  # another order than the batch's, ids that are not positions
    assert_fields(kept, 71, [907, 3001, 5], sum(prompt_len[i] + 2 for i in (907, 3001, 5)), model, in_order=False)
    assert kept.max_tokens < held  # request 12's blocks went back at once
    for _ in range(3):
        response = run.decode(kept)
        assert {g.request_id for g in response.generations} == {907, 3001, 5}
        kept = response.batch

    kept = run.filter(71, [5, 3001])
    assert_fields(kept, 71, [3001, 5], sum(prompt_len[i] + 5 for i in (3001, 5)), model, in_order=False)
    response = run.decode(kept)
    kept = run.filter(71, [3001])
    assert_fields(kept, 71, [3001], prompt_len[3001] + 6, model)
    run.to_the_end(kept)

    assert run.tokens[3001] == alone[3001] and run.finished[3001].finish_reason == pb.FINISH_REASON_LENGTH
    assert run.tokens[5] == alone[5][:6] and run.tokens[907] == alone[907][:5] and run.tokens[12] == alone[12][:2]
    assert set(run.finished) == {3001}
    assert model.cache.all_free and not model.batches


def test_concatenated_batches_decode_as_one(served, prompt_len, alone):
    client, model = served
    run = Run(client)
    first = run.decode(run.prefill(72, [907, 12]).batch).batch  # 2 tokens each
    second = run.prefill(73, [3001]).batch  # 1 token
    assert held_tokens(model) == first.max_tokens + second.max_tokens

    response = run.decode(first, second)  # the router's Decode([running, new])
    assert_fields(response.batch, 72, [907, 12, 3001], first.current_tokens + second.current_tokens + 3, model)
    assert response.batch.max_tokens == first.max_tokens + second.max_tokens
    assert set(model.batches) == {72}

    # new requests joining through Prefill's cached_batch: the cached batch's requests first, then the new
    merged = run.prefill(74, [5], cached=response.batch).batch
    assert_fields(merged, 72, [907, 12, 3001, 5], response.batch.current_tokens + prompt_len[5] + 1, model)
    assert set(model.batches) == {72}

    kept = run.filter(72, [907, 3001, 5])  # then a filter of the concatenated batch
    assert_fields(kept, 72, [907, 3001, 5], merged.current_tokens - prompt_len[12] - 3, model, in_order=False)
    run.to_the_end(kept)
    for rid in (907, 3001, 5):
        assert run.tokens[rid] == alone[rid], rid
    assert run.tokens[12] == alone[12][:3]
    assert model.cache.all_free and not model.batches


def test_concatenation_in_another_order_and_finishing_inside_it(served, alone):
    """Decode([new, running]): the first batch names the result; requests that finish inside a
    concatenated batch leave it and the others go on unchanged."""
    client, model = served
    run = Run(client)
    running = run.prefill(80, [12, 5]).batch
    new = run.prefill(81, [3001, 907]).batch
    response = run.decode(new, running)
    assert response.batch.id == 81 and list(response.batch.request_ids) == [3001, 907, 12, 5]
    run.to_the_end(response.batch)
    assert run.tokens == alone
    assert {rid: t.generated_tokens for rid, t in run.finished.items()} == NEW
    assert model.cache.all_free and not model.batches


def test_clear_cache_of_one_batch_leaves_the_other(served, alone):
    client, model = served
    run = Run(client)
    a = run.prefill(75, [907, 3001]).batch
    b = run.prefill(76, [12, 5]).batch
    assert held_tokens(model) == a.max_tokens + b.max_tokens
    client.stub.ClearCache(pb.ClearCacheRequest(id=75))
    assert held_tokens(model) == b.max_tokens and set(model.batches) == {76}
    run.to_the_end(b)
    assert run.tokens[12] == alone[12] and run.tokens[5] == alone[5]
    assert model.cache.all_free and not model.batches
    a = run.prefill(77, [907]).batch  # ids of a cleared batch are free again
    run.prefill(78, [3001])
    client.stub.ClearCache(pb.ClearCacheRequest())
    assert model.cache.all_free and not model.batches and a.size == 1
