"""Benchmark structmar's self-attention paths: time (fwd+bwd) and peak memory.

    python tools/bench_attention.py [--batch 64] [--heads 16] [--head-dim 80] [--iters 20]

On CUDA it runs MAR-Huge decoder shapes (batch 64, 16 heads, head dim 80, 64 buffer + 256 image
tokens, bf16) for: sdpa with the dense layout bias (the reference path), flex with the bias
(score_mod, compiled), and sdpa's flash kernel without any bias (the floor). On CPU FlexAttention has
no backward, so it runs a reduced shape forward-only and says so.
"""

from __future__ import annotations

import argparse
import time

import torch

from structmar.attention import (
    BOX,
    IMAGE,
    NULL,
    TEXT,
    LayoutBias,
    TokenTable,
    cell_ranges,
    flex_attention,
    sdpa_attention,
)


def synthetic_table(batch: int, grid: int, buffer: int, num_boxes: int, device) -> TokenTable:
    """[text, boxes, nulls] + a grid x grid image, random boxes per sample."""
    g = torch.Generator().manual_seed(0)
    L = grid * grid
    x0 = torch.rand(batch, num_boxes, 2, generator=g) * 0.7
    boxes = torch.cat([x0, x0 + 0.05 + torch.rand(batch, num_boxes, 2, generator=g) * 0.25], -1).clamp(max=1)
    kind = torch.tensor([TEXT] + [BOX] * num_boxes + [NULL] * (buffer - 1 - num_boxes) + [IMAGE] * L)
    cells = torch.arange(L)
    ranges = torch.zeros(batch, buffer + L, 4, dtype=torch.long)
    ranges[:, 1:1 + num_boxes] = cell_ranges(boxes, grid)
    expand = lambda t: t.expand(batch, -1).contiguous().to(device)
    return TokenTable(expand(kind), expand(torch.cat([torch.full((buffer,), L), cells])),
                      expand(torch.cat([torch.zeros(buffer, dtype=torch.long), cells // grid])),
                      expand(torch.cat([torch.zeros(buffer, dtype=torch.long), cells % grid])),
                      *(r.contiguous().to(device) for r in ranges.unbind(-1)))


def measure(fn, iters: int, backward: bool, device) -> tuple[float, float]:
    """(ms per call, peak MiB) after two warm-up calls (compilation happens there)."""
    for _ in range(2):
        out = fn()
        if backward:
            out.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
        if backward:
            out.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / iters * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return ms, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--boxes", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backward = device.type == "cuda"
    dtype = torch.bfloat16 if backward else torch.float32
    if not backward:  # FlexAttention on CPU: forward only, and a shape this box finishes
        args.batch, args.heads, args.grid, args.iters = 2, 4, 8, 5
        print("CPU: no FlexAttention backward here; reduced shape "
              f"(batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, "
              f"{args.buffer}+{args.grid**2} tokens, fp32), forward only")
    N = args.buffer + args.grid**2
    shape = (args.batch, args.heads, N, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    lam = torch.full((args.heads,), 2.0, device=device, requires_grad=backward)
    bias = LayoutBias(synthetic_table(args.batch, args.grid, args.buffer, args.boxes, device), mode="soft")

    def flash_no_bias():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not backward:  # CPU: whatever kernel sdpa picks without a mask
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    runs = {
        "sdpa + dense bias": lambda: sdpa_attention(q, k, v, bias=bias, lam=lam),
        "flex + bias (score_mod)": lambda: flex_attention(q, k, v, bias=bias, lam=lam),
        "sdpa flash, no bias" if backward else "sdpa, no bias": flash_no_bias,
    }
    print(f"device {device}, q/k/v {tuple(shape)} {dtype}, {'fwd+bwd' if backward else 'fwd'}, {args.iters} iters")
    for name, fn in runs.items():
        with torch.set_grad_enabled(backward):
            ms, peak = measure(fn, args.iters, backward, device)
        print(f"{name:28s} {ms:9.2f} ms   peak {peak:9.1f} MiB")


if __name__ == "__main__":
    main()
