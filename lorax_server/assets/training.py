"""The training loop both asset scripts share: random windows of a token stream, AdamW, warm-up then
cosine decay to 10%, bounded by steps or wall-clock time (whichever ends first)."""

import math
import time
from typing import Callable, Iterable, Tuple

import torch


def windows(data: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq_len + 1] random windows of `data`, each starting with <s> (id 1) as prompts do."""
    starts = torch.randint(0, len(data) - seq_len, (batch,), generator=generator)
    body = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), body], dim=1)


def train(model, params: Iterable[torch.nn.Parameter], data: torch.Tensor, args, loss_of: Callable,
          warmup: int, weight_decay: float, log_every: int, tag: str = "") -> Tuple[float, int]:
    """Trains until args.steps or args.minutes; `loss_of(model, batch)` returns (loss to minimise, LM loss
    to report). Returns (mean reported loss of the last `log_every` steps, steps taken)."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60 or math.inf
    losses, step, start = [], 0, time.time()
    model.train()
    while step < args.steps:
        progress = max(step / args.steps, (time.time() - start) / budget_s)  # drives the schedule
        if progress >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, reported = loss_of(model, windows(data, args.seq_len, args.batch, generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(reported)
        step += 1
        if step % log_every == 0:
            recent = losses[-log_every:]
            print(f"{tag}step {step:5d}  lr {lr:.2e}  loss {sum(recent) / len(recent):.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    recent = losses[-log_every:] or [math.nan]
    final = sum(recent) / len(recent)
    print(f"{tag}final training loss (mean of last {len(recent)} steps): {final:.3f} after {step} steps, "
          f"{time.time() - start:.0f}s")
    return final, step
