"""bench.prefill on the CPU with the embedded tiny model: the three tables come out, with a real prefix hit
(the cached run does less work) and the chunked prompt completing beside the running decodes."""

import torch

from bench import prefill


def test_smoke_prefill_prefix_and_chunks():
    threads = torch.get_num_threads()
    try:
        tables = prefill.main(["--smoke"])
    finally:
        torch.set_num_threads(threads)
    assert [row[0] for row in tables["plain"]] == ["1 x 64", "4 x 16"]
    assert all(float(row[1]) > 0 for row in tables["plain"])
    (prefix_row,) = tables["prefix"]
    assert float(prefix_row[5].rstrip("x")) > 1  # the 32 shared tokens come from the cache
    assert [row[0] for row in tables["chunked"]] == ["alone", "chunks of 24", "one piece"]
    assert int(tables["chunked"][1][1]) > 2  # the long prompt took several chunks, each a decode call
