"""The runner's packing: one typed forward batch whose every field is what the cache layout says."""

import torch

from lorax_server.engine.cache import PagedKVCache, PagedSequence
from lorax_server.engine.runner import BlockTables, mark_cached, pack, pack_decode


def tiny_cache(block_size=4, num_blocks=16):
    return PagedKVCache(1, num_blocks, block_size, 1, 2, torch.float32, "cpu", shuffle_seed=5)


def slot(seq, position, block_size):
    return seq.blocks[position // block_size] * block_size + position % block_size


def test_a_ragged_batch_with_cached_prefixes_packs_where_the_blocks_say():
    cache = tiny_cache()
    seqs = [PagedSequence(list(range(10, 17)), adapter_index=2), PagedSequence([5, 6, 7], cached=0),
            PagedSequence(list(range(30, 40)), adapter_index=1, cached=6)]
    seqs[2].reserve(cache, 6)  # its prefix is already in blocks of its own
    counts = [7, 3, 4]
    batch = pack(seqs, counts, cache, prefill=True, device="cpu")

    assert batch.size == 3 and batch.adapter_indices == {0, 1, 2}
    assert batch.input_ids.tolist() == list(range(10, 17)) + [5, 6, 7] + list(range(36, 40))
    assert batch.position_ids.tolist() == list(range(7)) + list(range(3)) + list(range(6, 10))
    expected_slots = [slot(s, p, 4) for s, n in zip(seqs, counts) for p in range(s.cached, s.cached + n)]
    assert batch.slots.tolist() == expected_slots
    assert batch.token_adapters.tolist() == [2] * 7 + [0] * 3 + [1] * 4
    assert batch.cu_seqlen_prefill.tolist() == [0, 7, 10, 14]
    assert batch.lm_head_indices.tolist() == [6, 9, 13]  # each sequence's last new token
    assert batch.seqlen.input_lengths.tolist() == counts and batch.seqlen.cache_lengths.tolist() == [0, 0, 6]
    # The longest runs come from the host's lists (no device reduction, no wait for the GPU).
    assert (batch.seqlen.max_q, batch.seqlen.max_k) == (7, 10)
    width = max(len(s.blocks) for s in seqs)
    assert batch.block_tables.tolist() == [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
    assert batch.block_tables.dtype == torch.int32 and batch.slots.dtype == torch.int64


def test_a_decode_step_packs_one_token_per_sequence_and_no_prefill_offsets():
    cache = tiny_cache()
    seqs = [PagedSequence([1, 2, 3, 4, 5], cached=4), PagedSequence([9, 8], cached=1)]
    for s in seqs:
        s.reserve(cache, len(s.tokens))
    batch = pack(seqs, [1, 1], cache, prefill=False, device="cpu")
    assert batch.cu_seqlen_prefill is None and batch.input_ids.tolist() == [5, 8]
    assert batch.position_ids.tolist() == [4, 1] and batch.lm_head_indices.tolist() == [0, 1]
    assert (batch.seqlen.max_q, batch.seqlen.max_k) == (1, 5)
    inputs = batch.model_inputs(cache.layers)
    assert inputs["max_s"] == 5 and inputs["kv_cache"] is cache.layers and inputs["adapter_data"] is None


def test_all_logits_keeps_every_token_and_mark_cached_advances():
    cache = tiny_cache()
    seqs = [PagedSequence([1, 2, 3]), PagedSequence([4, 5])]
    batch = pack(seqs, [3, 2], cache, prefill=True, device="cpu", all_logits=True)
    assert batch.lm_head_indices is None
    mark_cached(seqs, [3, 2])
    assert [s.cached for s in seqs] == [3, 2]


def test_the_decode_packing_equals_the_general_one_and_reuses_the_table():
    cache = tiny_cache(num_blocks=32)
    seqs = [PagedSequence(list(range(9)), adapter_index=1, cached=8), PagedSequence([4, 5, 6], cached=2),
            PagedSequence(list(range(20, 33)), adapter_index=3, cached=12)]
    for s in seqs:
        s.reserve(cache, len(s.tokens) + 5)  # blocks for tokens still to come, as admission reserves them
    tables = BlockTables()
    fast, general = pack_decode(seqs, cache, "cpu", tables), pack(seqs, [1, 1, 1], cache, False, "cpu")
    for name in ("input_ids", "position_ids", "slots", "token_adapters", "block_tables", "lm_head_indices"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    for name in ("input_lengths", "cache_lengths", "cu_seqlen_q", "max_q", "max_k"):
        a, b = getattr(fast.seqlen, name), getattr(general.seqlen, name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name
    assert fast.adapter_indices == general.adapter_indices and fast.cu_seqlen_prefill is None
    mark_cached(seqs, [1, 1, 1])
    for s in seqs:
        s.tokens.append(7)
    again = pack_decode(seqs, cache, "cpu", tables)
    assert again.block_tables is fast.block_tables  # same batch: the table is not uploaded again
    assert again.position_ids.tolist() == [9, 3, 13]
    fewer = pack_decode(seqs[1:], cache, "cpu", tables)  # another batch: its own table
    assert fewer.block_tables.tolist() == fast.block_tables[1:].tolist()


def test_every_packed_tensor_starts_16_byte_aligned_whatever_the_batch_size():
    """Triton compiles a kernel per pattern of aligned pointer arguments: were the sections of the packed copy
    back to back, each new batch size could mean a compile in the middle of serving."""
    for size in range(1, 8):
        cache = tiny_cache(num_blocks=64)
        seqs = [PagedSequence(list(range(3 + i)), cached=i % 3) for i in range(size)]
        counts = [len(s.tokens) - s.cached for s in seqs]
        prefill = pack(seqs, counts, cache, prefill=True, device="cpu")
        fields = [prefill.input_ids, prefill.position_ids, prefill.slots, prefill.token_adapters,
                  prefill.lm_head_indices, prefill.block_tables, prefill.seqlen.input_lengths,
                  prefill.seqlen.cache_lengths, prefill.seqlen.cu_seqlen_q]
        mark_cached(seqs, counts)
        for s in seqs:
            s.tokens.append(100 + len(s.tokens))  # the token each one chose
        decode = pack_decode(seqs, cache, "cpu", BlockTables())
        fields += [decode.input_ids, decode.position_ids, decode.token_adapters]
        assert all(t.data_ptr() % 16 == 0 for t in fields), size
        assert decode.token_adapters.tolist() == [0] * size and decode.input_ids.tolist() == [s.tokens[-1] for s in seqs]


def test_prefill_steps_of_the_same_sequences_share_one_device_table_until_a_block_is_added():
    """Chunk after chunk of one prompt beside the same decodes: the table is copied to the device once."""
    cache, tables = tiny_cache(), BlockTables()
    seqs = [PagedSequence(list(range(20))), PagedSequence([1, 2, 3, 4, 5], cached=4)]
    seqs[0].reserve(cache, 20)  # the router's blocks, reserved at admission
    seqs[1].reserve(cache, 8)
    first = pack(seqs, [6, 1], cache, prefill=True, device="cpu", tables=tables)
    mark_cached(seqs, [6, 1])
    seqs[1].tokens.append(6)
    second = pack(seqs, [6, 1], cache, prefill=True, device="cpu", tables=tables)
    assert second.block_tables.data_ptr() == first.block_tables.data_ptr()  # the same device tensor
    assert torch.equal(second.block_tables, pack(seqs, [6, 1], cache, prefill=True, device="cpu").block_tables)
    mark_cached(seqs, [6, 1])
    seqs[1].tokens += [7, 8, 9]
    grown = pack(seqs, [6, 4], cache, prefill=True, device="cpu", tables=tables)  # seq 1 needs a third block
    assert grown.block_tables.data_ptr() != first.block_tables.data_ptr() and len(seqs[1].blocks) == 3
    width = max(len(s.blocks) for s in seqs)
    assert grown.block_tables.tolist() == [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
