"""bench.serve on the CPU with the embedded tiny model, so the GPU benchmark cannot rot: it runs end to end
with and without adapters, its numbers are positive, every request makes exactly its output length, the
router loop keeps its budgets, and the warm-up covers every decode graph a timed run replays."""

import pytest
import torch

from bench import serve
from lorax_server.engine.graphs import DecodeGraphs


@pytest.fixture
def threads():
    """The smoke sets one CPU thread (a tiny model); the other tests get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_smoke_closed_and_open_loops_with_adapters(threads, capsys):
    records = serve.main(["--smoke", "--adapters", "4", "--expert-adapters", "1", "--shapes", "16x8", "40x8",
                          "--requests", "8", "--open-requests", "4"])
    assert [(r["mode"], r["shape"], r["model"]) for r in records] == [
        ("closed", "16x8", "base"), ("closed", "40x8", "base"), ("open", "16x8", "base"),
        ("closed", "16x8", "4 adapters"), ("closed", "40x8", "4 adapters"), ("open", "16x8", "4 adapters")]
    for r in records:
        assert r["requests"] == (8 if r["mode"] == "closed" else 4)
        assert r["exact_lengths"] == r["requests"]
        assert r["output_tokens"] == 8 * r["requests"]
        for key in ("wall_s", "tok_s", "req_s", "floor_s", "floor_share", "ttft_p50_ms", "ttft_p99_ms",
                    "tpot_p50_ms", "tpot_p99_ms", "mean_decode_batch", "prefill_share"):
            assert r[key] > 0, key
        assert 0 < r["mean_decode_batch"] <= r["max_batch"]
        assert (r["vs_base"] is not None) == (r["model"] != "base" and r["mode"] == "closed")
    assert all(r["rate"] > 0 for r in records if r["mode"] == "open")
    out = capsys.readouterr().out
    assert "Closed loop" in out and "Open loop" in out
    assert sum(line.startswith('{"bench": "serve"') for line in out.splitlines()) == len(records)


def test_smoke_in_fp8_with_adapters(threads):
    """--fp8 (the CPU's dequantizing FP8 path; W8A8 kernels on the GPU), LoRA on the FP8 base included."""
    records = serve.main(["--smoke", "--fp8", "--adapters", "2", "--expert-adapters", "1", "--shapes", "16x8",
                          "--requests", "6", "--open-requests", "0"])
    assert [r["model"] for r in records] == ["base", "2 adapters"] and all(r["fp8"] for r in records)
    assert all(r["exact_lengths"] == r["requests"] == 6 and r["tok_s"] > 0 for r in records)


class RecordingGraphs(DecodeGraphs):
    """Decode graphs that only record the key each decode step would replay, and run it eagerly (CPU)."""

    def __init__(self, engine, max_positions):
        super().__init__(engine.model, engine.cache.layers, engine.cache.block_size, max_positions)
        self.keys = set()

    def run(self, batch, adapter_data=None, *args, **kwargs):
        signature = None if adapter_data is None else adapter_data.expert_lora_layers()
        self.keys.add(self.bucket(len(batch.seqlen.input_lengths), batch.seqlen.max_k) + (signature,))
        return None


def test_warm_up_covers_the_run_and_the_loop_keeps_its_budgets(threads):
    args = serve.parse_args(["--smoke", "--adapters", "4", "--expert-adapters", "1"])
    engine, adapters, _, group, _ = serve.setup(args)
    engine.graphs = graphs = RecordingGraphs(engine, engine.config.max_position_embeddings)
    total = (engine.cache.num_blocks - 1) * engine.cache.block_size
    loop = serve.RouterLoop(engine, total, args.max_prefill_tokens, args.max_batch, clock=serve.Clock(group))
    warm = serve.WarmUp(engine, loop, args.max_batch)
    warmed = set()  # the warm-up captures each key once, for whichever shape needs it first
    for kinds, count in (([0], 0), (serve.adapter_kinds(args), args.adapters)):
        if count:
            engine.adapters.publish(adapters)
        for shape in ((16, 8), (40, 8)):
            graphs.keys.clear()
            warm(shape, kinds)
            warmed |= graphs.keys
            graphs.keys.clear()
            trace = loop.run(serve.workload(shape, 12, None, engine.config.vocab_size, count, 0, 1))
            assert graphs.keys and graphs.keys <= warmed
            assert all(s.exact for s in trace.served.values())
            assert engine.cache.all_free
            check_budgets(trace, sum(shape) - 1, engine.cache.block_size, total, args)
    assert {key[2] for key in warmed} == {None, frozenset(), frozenset(range(engine.config.num_hidden_layers))}


def check_budgets(trace, cache_tokens: int, block: int, total: int, args) -> None:
    """No prefill past max_batch_prefill_tokens, no batch past --max-batch or past the cache."""
    held = -(-cache_tokens // block) * block
    for step in trace.steps:
        assert len(step.lengths) <= args.max_batch
        if step.kind == "prefill":
            assert sum(step.lengths) <= args.max_prefill_tokens
        else:
            assert len(step.lengths) * held <= total


def test_smoke_chunked_prefill_of_a_long_prompt_in_the_open_loop(threads, capsys):
    """--long-prompt: the open loop again with the router's chunked prefill (a prefill budget of --chunk-tokens,
    the long prompt joining the running batch in chunks), without and with it; its chunks ran beside decodes."""
    serve.main(["--smoke", "--shapes", "16x8", "--requests", "4", "--open-requests", "8", "--rate", "400",
                "--long-prompt", "150", "--chunk-tokens", "48"])
    out = capsys.readouterr().out
    assert "Chunked prefill in the open loop" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| without it") or line.startswith("| with 150 tokens in chunks")}
    assert set(rows) == {"without it", "with 150 tokens in chunks"}
    assert int(rows["with 150 tokens in chunks"][0]) > 0  # decode calls that ran a chunk beside decodes
    assert float(rows["with 150 tokens in chunks"][-1]) > 0  # the long prompt's TTFT


def test_the_chunked_router_loop_serves_a_prompt_longer_than_the_prefill_budget(threads):
    """RouterLoop(chunked=True): a 150-token prompt under a 48-token budget is prefilled in chunks (no prefill
    call runs more than the budget), beside running requests that keep getting tokens, and every request makes
    exactly its output length."""
    args = serve.parse_args(["--smoke"])
    engine = serve.smoke_engine(args, 1)
    total = (engine.cache.num_blocks - 1) * engine.cache.block_size
    loop = serve.RouterLoop(engine, total, 48, 8, chunked=True)
    vocab = engine.config.vocab_size
    arrivals = serve.workload((16, 8), 4, None, vocab, 0, 0, 5)
    arrivals.append(serve.Arrival(4, 0.0, torch.randint(3, vocab, (150,)).tolist(), 4))
    with torch.no_grad():
        trace = loop.run(arrivals)
    assert all(s.exact for s in trace.served.values())
    assert all(sum(st.lengths) <= 48 for st in trace.steps if st.kind == "prefill")
    beside = [st for st in trace.steps if st.kind == "decode" and 4 in st.prefilling and len(st.lengths) > 1]
    assert beside, "a chunk of the long prompt ran beside decoding requests"
    assert engine.max_prefill_tokens is None and engine.cache.all_free


def test_smoke_structured_output_and_prefix_caching_rows(threads, capsys):
    """--structured and --prefix: the same batch served free and half constrained (both run whole for some
    decode calls), and a shared prefix prefilled without and with the router's cached blocks."""
    serve.main(["--smoke", "--shapes", "16x8", "--requests", "4", "--open-requests", "0", "--open-shape", "16x24",
                "--structured", "6", "--prefix", "32"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert int(rows["free"][0]) > 0 and rows["free"][2] == "1.000x"
    constrained = rows["3 constrained"]
    assert int(constrained[0]) > 0 and float(constrained[2].rstrip("x")) > 0
    assert constrained[3].endswith("of 3")  # the constrained outputs are counted, and only those
    cached = rows["4 x (32 shared + 8)"]
    assert all(float(c.rstrip("x")) > 0 for c in cached)


def test_valid_json_checks_the_schema():
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    assert serve.valid_json('{"n": 3}', schema)
    assert not serve.valid_json('{"n": "3"}', schema) and not serve.valid_json('{"n": 3', schema)
