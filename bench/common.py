"""Measuring on the device: the two ceilings (copy bandwidth, bf16 matmul rate) and a median timer."""

import statistics

import torch


def time_ms(fn, warmup: int = 5, repeat: int = 30) -> float:
    """Median of `repeat` timed calls (CUDA events), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph_ms(fn, repeat: int = 30) -> float:
    """Median time of replaying `fn` captured in a CUDA graph (launch overhead removed, as in a decode
    loop that replays graphs); falls back to eager timing when `fn` cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # host synchronisation inside fn: not capturable
        torch.cuda.synchronize()
        return float("nan")
    return time_ms(graph.replay, warmup=3, repeat=repeat)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, repeat=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on random data."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: a @ b, warmup=3, repeat=10)
    return 2 * 8192**3 / (ms * 1e-3)


def fp8_matmul_rate() -> float:
    """FP8 (e4m3) FLOP/s of an 8192^3 torch._scaled_mm on random data, row-wise scales, bf16 output (the
    mode the FP8 linears use)."""
    a, b = (torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn) for _ in range(2))
    scale_a, scale_b = torch.ones(8192, 1, device="cuda"), torch.ones(1, 8192, device="cuda")
    ms = time_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16),
                 warmup=3, repeat=10)
    return 2 * 8192**3 / (ms * 1e-3)


def card() -> str:
    return torch.cuda.get_device_name()


def print_table(title: str, header, rows) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
