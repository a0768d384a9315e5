"""Design sweep behind the E8 rates: which stage order, which search, which load and residual.

Regenerates the "Design choices" table of docs/codec.md: for each candidate two-stage E8 code
(first codebook, second codebook, greedy or joint search) it grid-searches the load (codebook
units per data RMS) and the residual fraction, on i.i.d. Gaussian vectors of d = 128 with the
same least-squares scale as the codec, and prints the best relative MSE.

    PYTHONPATH=src python benchmarks/codec_design.py     # about 3 minutes on 2 cores
"""

from __future__ import annotations

import torch
from torch import Tensor

from nexusquant_cache.codec import OrbitCodebook, ball_codebook, lloyd_max_levels, shell_codebook


def relative_mse(x: Tensor, blocks: Tensor) -> float:
    """Error after the codec's least-squares scale, for codewords ``blocks`` [n * d / 8, 8]."""
    c = blocks.reshape(x.shape)
    scale = (x * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True)
    return ((x - scale * c).pow(2).sum() / x.pow(2).sum()).item()


def two_stage(y: Tensor, first: OrbitCodebook, second: OrbitCodebook | None, residual: float, joint: bool) -> Tensor:
    proposals = first.nearest_per_orbit(y) if joint else first.nearest(y)[0][None]
    if second is None:
        return proposals[0]
    points = torch.stack([p + residual * second.nearest((y - p) / residual)[0] for p in proposals])
    choice = (y - points).pow(2).sum(-1).argmin(0)
    return points[choice, torch.arange(len(y))]


def best(x: Tensor, loads, residuals, first, second, joint) -> tuple[float, float, float]:
    """The smallest error over the grid of loads and residual fractions, and where it is."""
    return min(
        (relative_mse(x, two_stage((x / load).reshape(-1, 8), first, second, residual, joint)), load, residual)
        for load in loads
        for residual in residuals
    )


def main() -> None:
    torch.set_num_threads(2)
    x = torch.randn(4000, 128, generator=torch.Generator().manual_seed(0))
    ball, shell = ball_codebook(), shell_codebook()
    grid = [0.9 + 0.05 * i for i in range(30)]
    candidates = [
        ("2 bits", "ball (16)", (ball, None, False), [0.0]),
        ("3 bits", "ball (16) + shell (8), greedy", (ball, shell, False), [0.4, 0.45, 0.5, 0.55, 0.6]),
        ("3 bits", "shell (8) + ball (16), greedy", (shell, ball, False), [0.25, 0.28, 0.3, 0.35]),
        ("3 bits", "shell (8) + ball (16), joint over the shell's 3 orbits", (shell, ball, True), [0.25, 0.28, 0.3]),
        ("4 bits", "ball (16) + ball (16), greedy", (ball, ball, False), [0.2, 0.25, 0.3]),
    ]
    print("| rate | stages (index bits) | best relative MSE | load | residual |")
    print("|---|---|---|---|---|")
    for rate, name, code, residuals in candidates:
        mse, load, residual = best(x, grid, residuals, *code)
        print(f"| {rate} | {name} | {mse:.4f} | {load:.2f} | {residual or '-'} |", flush=True)
    for bits in (2, 3, 4):
        levels = lloyd_max_levels(bits).float()
        codes = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
        print(f"| {bits} bits | Lloyd-Max scalar, for reference | {relative_mse(x, levels[codes]):.4f} | 1.00 | - |")


if __name__ == "__main__":
    main()
