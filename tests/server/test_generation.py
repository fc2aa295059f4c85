"""Generation through real gRPC: equal to transformers (and PEFT) greedy generate, batching invariance,
FilterBatch, ClearCache, router-allocated blocks."""

import torch

from lorax_server.client import generated_ids, make_request
from lorax_server.pb import generate_pb2 as pb
from tests.server.conftest import hf_greedy

PROMPTS = ["The for statement", "A list is a mutable sequence", "Exceptions", "def f(x): return"]
NEW = 14


def run(client, batch_id, requests):
    steps = []
    finished = client.run_to_completion(batch_id, requests, on_step=steps.append)
    return finished, generated_ids(steps)


def test_greedy_batch_equals_transformers_generate(served, hf_model):
    client, model = served
    requests = [make_request(i, p, max_new_tokens=NEW, ignore_eos_token=True) for i, p in enumerate(PROMPTS)]
    finished, ids = run(client, 1, requests)
    for i, prompt in enumerate(PROMPTS):
        assert ids[i] == hf_greedy(hf_model, model.tokenizer, prompt, NEW)
        assert finished[i].generated_tokens == NEW and finished[i].finish_reason == pb.FINISH_REASON_LENGTH
        assert finished[i].text == model.tokenizer.decode(ids[i], skip_special_tokens=True)
    assert model.cache.all_free


def test_adapters_equal_peft_generate(served, adapters):
    client, model = served
    for index, name in ((11, "attn"), (12, "experts")):
        assert client.load_adapter(index, str(adapters[name][0]))
    requests = [make_request(i, p, max_new_tokens=NEW, ignore_eos_token=True, adapter_index=[11, 12][i % 2])
                for i, p in enumerate(PROMPTS)]
    _, ids = run(client, 2, requests)
    for i, prompt in enumerate(PROMPTS):
        peft_model = adapters[["attn", "experts"][i % 2]][1]
        assert ids[i] == hf_greedy(peft_model, model.tokenizer, prompt, NEW)


def test_mixed_batch_equals_each_request_alone(served, adapters):
    client, _ = served
    for index, name in ((21, "attn"), (22, "experts")):
        client.load_adapter(index, str(adapters[name][0]))
    lengths = [5, 17, 9, 11]
    requests = [make_request(i, PROMPTS[i], max_new_tokens=lengths[i], adapter_index=[0, 21, 22, 21][i],
                             ignore_eos_token=True) for i in range(4)]
    _, together = run(client, 3, requests)
    for i, request in enumerate(requests):
        _, alone = run(client, 100 + i, [request])
        assert together[i] == alone[i]


def test_filter_batch_mid_generation_leaves_the_rest_unchanged(served):
    client, model = served
    requests = [make_request(i, p, max_new_tokens=10, ignore_eos_token=True) for i, p in enumerate(PROMPTS)]
    _, full = run(client, 4, requests)
    response = client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=5, requests=requests, size=4)))
    steps = list(response.generations)
    response = client.stub.Decode(pb.DecodeRequest(batches=[response.batch]))
    steps += response.generations
    free_before = len(model.cache.free_blocks)
    kept = client.stub.FilterBatch(pb.FilterBatchRequest(batch_id=5, request_ids=[1, 3])).batch
    assert list(kept.request_ids) == [1, 3] and len(model.cache.free_blocks) > free_before
    while True:
        response = client.stub.Decode(pb.DecodeRequest(batches=[kept]))
        steps += response.generations
        if not response.HasField("batch"):
            break
        kept = response.batch
    ids = generated_ids(steps)
    assert ids[1] == full[1] and ids[3] == full[3]
    assert model.cache.all_free


def test_clear_cache_frees_blocks(served):
    client, model = served
    requests = [make_request(i, p, max_new_tokens=30) for i, p in enumerate(PROMPTS)]
    client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=6, requests=requests, size=4)))
    second = [make_request(len(PROMPTS), PROMPTS[0], max_new_tokens=30)]  # request ids are unique across batches
    client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=7, requests=second, size=1)))
    assert len(model.cache.free_blocks) < model.cache.num_blocks
    client.stub.ClearCache(pb.ClearCacheRequest(id=6))
    assert list(model.batches) == [7]
    client.stub.ClearCache(pb.ClearCacheRequest())
    assert model.cache.all_free and not model.batches


def test_router_allocated_blocks_and_server_allocated_together(served, hf_model):
    client, model = served
    bs = model.cache.block_size
    prompt_ids = model.tokenizer(PROMPTS[1])["input_ids"]
    blocks = [77, 3]  # scattered, chosen by the "router"
    slots = [blocks[p // bs] * bs + p % bs for p in range(len(prompt_ids))]
    requests = [make_request(0, PROMPTS[0], max_new_tokens=NEW, ignore_eos_token=True),
                make_request(1, PROMPTS[1], max_new_tokens=NEW, ignore_eos_token=True, blocks=blocks, slots=slots)]
    _, ids = run(client, 8, requests)
    for i in range(2):
        assert ids[i] == hf_greedy(hf_model, model.tokenizer, PROMPTS[i], NEW)
    assert sorted(model.cache.free_blocks) == list(range(1, model.cache.num_blocks)) and model.cache.all_free


def test_tokenized_inputs_truncate_and_prefill_logprobs(served, hf_model):
    client, model = served
    ids = model.tokenizer(PROMPTS[1])["input_ids"]
    request = make_request(0, ids=ids, truncate=4, max_new_tokens=3, prefill_logprobs=True,
                           return_k_alternatives=3)
    response = client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=9, requests=[request], size=1)))
    generation = response.generations[0]
    assert list(generation.prefill_tokens.ids) == ids[-4:] and generation.prefill_tokens_length == 4
    with torch.no_grad():
        want = hf_model(torch.tensor([ids[-4:]])).logits[0].log_softmax(-1)
    got = list(generation.prefill_tokens.logprobs)
    assert torch.isnan(torch.tensor(got[0]))
    torch.testing.assert_close(torch.tensor(got[1:]), want[torch.arange(3), torch.tensor(ids[-3:])], atol=1e-4, rtol=0)
    alternatives = generation.next_tokens.alternative_tokens[0]
    assert alternatives.ids[0] == generation.next_tokens.ids[0] and len(alternatives.ids) == 3
    torch.testing.assert_close(alternatives.logprobs[0], want[-1].max().item(), atol=1e-4, rtol=0)
    client.stub.ClearCache(pb.ClearCacheRequest(id=9))


def test_sampling_with_a_seed_is_reproducible_and_stop_sequences_stop(served):
    client, model = served
    sampled = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, typical_p=0.99, seed=1234,
                   repetition_penalty=1.2, frequency_penalty=0.1, presence_penalty=0.1)
    first, _ = run(client, 10, [make_request(0, PROMPTS[0], max_new_tokens=12, **sampled)])
    again, _ = run(client, 11, [make_request(0, PROMPTS[0], max_new_tokens=12, **sampled)])
    assert first[0].text == again[0].text and first[0].seed == 1234
    greedy, ids = run(client, 12, [make_request(0, PROMPTS[0], max_new_tokens=20, ignore_eos_token=True)])
    # A stop sequence across the boundary of tokens 3 and 4 of the greedy text: the text then ends with it.
    last_prompt_token = model.tokenizer(PROMPTS[0])["input_ids"][-1:]
    prefix = model.tokenizer.decode(last_prompt_token + ids[0][:4])[len(model.tokenizer.decode(last_prompt_token)):]
    piece = model.tokenizer.decode(ids[0][3:4])
    stop = prefix[-len(piece) - 2:]
    stopped, _ = run(client, 13, [make_request(0, PROMPTS[0], max_new_tokens=20, stop_sequences=["@@", stop])])
    assert stopped[0].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert stopped[0].text == prefix and stopped[0].text.endswith(stop) and stopped[0].generated_tokens == 4
    assert greedy[0].text.startswith(prefix) and len(greedy[0].text) > len(prefix)
    seeded = [run(client, 14 + i, [make_request(0, PROMPTS[0], max_new_tokens=8, do_sample=True, seed=seed)])[1][0]
              for i, seed in enumerate((0, 0, 1))]
    assert seeded[0] == seeded[1] != seeded[2]  # seed 0 is a seed, not "unset"


def test_concurrent_calls_are_served_one_step_at_a_time(served):
    """Several clients at once (as a router with many connections would): every batch completes, each with
    the tokens it gets alone, and every block comes back."""
    from concurrent.futures import ThreadPoolExecutor

    client, model = served
    alone = {i: run(client, 200 + i, [make_request(0, p, max_new_tokens=6, ignore_eos_token=True)])[1][0]
             for i, p in enumerate(PROMPTS)}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda i: run(client, 300 + i, [make_request(i, PROMPTS[i], max_new_tokens=6,
                                                                             ignore_eos_token=True)])[1][i],
                                 range(len(PROMPTS))))
    assert together == [alone[i] for i in range(len(PROMPTS))]
    assert model.cache.all_free and not model.batches
