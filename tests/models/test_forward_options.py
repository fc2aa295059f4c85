"""The forward contract's options: lm_head_indices, skip_lm_head, prefill_cache_indices, chunked prefill."""

import torch

from lorax_server.engine.cache import PagedKVCache, PagedSequence
from lorax_server.engine.runner import mark_cached, pack
from tests.tiny_mixtral import load_ours, reference_logits, relative_error, save_tiny_mixtral


def new_cache(model, num_blocks=32, block_size=4):
    c = model.config
    return PagedKVCache(c.num_hidden_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                        torch.float32, "cpu", shuffle_seed=3)


def forward(model, seqs, counts, cache, prefill, **extra):
    inputs = pack(seqs, counts, cache, prefill, "cpu", all_logits=True).model_inputs(cache.layers)
    inputs.update(extra)
    out = model(**inputs)
    mark_cached(seqs, counts)
    return out


@torch.no_grad()
def test_lm_head_indices_and_skip_lm_head(tmp_path):
    hf = save_tiny_mixtral(tmp_path)
    model = load_ours(tmp_path)
    tokens = [list(range(3, 14)), list(range(40, 46))]
    cache = new_cache(model)
    seqs = [PagedSequence(list(t)) for t in tokens]
    picks = torch.tensor([10, 16])  # the last token of each packed sequence
    logits, speculative = forward(model, seqs, [11, 6], cache, True, lm_head_indices=picks)
    assert speculative is None and logits.shape == (2, 96)
    for row, t in zip(logits, tokens):
        assert relative_error(row, reference_logits(hf, t)[-1]) < 1e-4
    cache = new_cache(model)
    seqs = [PagedSequence(list(t)) for t in tokens]
    hidden, _ = forward(model, seqs, [11, 6], cache, True, lm_head_indices=picks, skip_lm_head=True)
    assert hidden.shape == (2, 64)
    torch.testing.assert_close(model.compute_logits(hidden), logits)


@torch.no_grad()
def test_sliding_window_cache_holds_only_the_window(tmp_path):
    """Upstream's contract: with a window, prefill caches only the last W tokens (prefill_cache_indices); slots
    come for every new token, as upstream's engine sends them, and the model keeps the cached ones."""
    window = 6
    hf = save_tiny_mixtral(tmp_path, sliding_window=window)
    model = load_ours(tmp_path)
    tokens = list(range(5, 25))
    prompt = 14
    cache = new_cache(model, block_size=4)
    seq = PagedSequence(list(tokens))
    inputs = pack([seq], [prompt], cache, True, "cpu", all_logits=True).model_inputs(cache.layers)
    keep = torch.arange(prompt - window, prompt)
    logits = [model(prefill_cache_indices=keep, **inputs)[0]]
    mark_cached([seq], [prompt])
    while seq.cached < len(tokens):
        logits.append(forward(model, [seq], [1], cache, False)[0])
    got = torch.cat(logits)
    want = reference_logits(hf, tokens)
    assert relative_error(got, want) < 1e-4 and torch.equal(got.argmax(-1), want.argmax(-1))


@torch.no_grad()
def test_prefill_in_chunks_on_top_of_a_cached_prefix(tmp_path):
    hf = save_tiny_mixtral(tmp_path, sliding_window=5)
    model = load_ours(tmp_path)
    tokens = [list(range(1, 18)), list(range(30, 39))]
    cache = new_cache(model)
    seqs = [PagedSequence(list(t)) for t in tokens]
    first = forward(model, seqs, [7, 4], cache, True)[0]
    second = forward(model, seqs, [10, 5], cache, True)[0]
    got = [torch.cat([first[:7], second[:10]]), torch.cat([first[7:], second[10:]])]
    for g, t in zip(got, tokens):
        assert relative_error(g, reference_logits(hf, t)) < 1e-4
