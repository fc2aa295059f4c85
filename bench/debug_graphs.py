"""Debug helper for the device: pieces of a decode step captured in CUDA graphs against eager runs."""

import torch
import torch.nn.functional as F

from lorax_server.kernels.fused_moe import align_by_expert, fused_moe
from lorax_server.layers.moe import route


def captured(fn, *static):
    graph = torch.cuda.CUDAGraph()
    fn(*static)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


x = torch.randn(8, 128, device="cuda")
w13 = torch.randn(4, 512, 128, device="cuda") / 11
w2 = torch.randn(4, 128, 256, device="cuda") / 16
gate = torch.randn(4, 128, device="cuda")
graph, out = captured(lambda x: fused_moe(x, w13, w2, *vars(route(F.linear(x, gate), 2)).values()), x)
for trial in range(3):
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    r = route(F.linear(x, gate), 2)
    want = fused_moe(x, w13, w2, r.weights, r.experts)
    print("fused_moe graph vs eager", trial, (out - want).abs().max().item())
print(align_by_expert(route(F.linear(x, gate), 2).experts, 4, 16))
