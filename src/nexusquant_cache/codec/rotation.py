"""Randomized Hadamard rotation for any head dimension.

Rotating a vector by a random orthogonal matrix spreads its energy evenly over coordinates, so
that every coordinate looks Gaussian with the same variance: the distribution our codebooks are
tuned for, and the reason 2-bit quantization works at all on keys with outlier channels.

For d = 2^k * m (m odd) the rotation is ``(H_{2^k} kron Q_m) diag(s) / sqrt(2^k)``: a Sylvester
Hadamard matrix, a seeded random orthogonal m x m block for the odd factor (m = 5 for d = 80,
m = 3 for d = 96; m = 1 for powers of two), and seeded random signs s. It is kept as one dense
d x d matrix per (d, seed, device): for head dimensions up to 256 one matrix multiply runs at BLAS
speed, faster in torch than the log2(d) passes of a butterfly transform (see docs/codec.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._tables import cached_table

__all__ = ["rotation_matrix", "rotate", "unrotate"]


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@cached_table(64)
def _matrix_cpu(dim: int, seed: int) -> Tensor:
    power = dim & -dim  # largest power of two dividing dim
    odd = dim // power
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(odd, odd, dtype=torch.float64, generator=generator))
    q = (q * torch.sign(torch.diagonal(r))).contiguous()  # a Haar-random orthogonal matrix, not just any QR output
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64) * 2 - 1
    matrix = torch.kron(_sylvester(power), q) * signs / power**0.5
    return matrix.float().contiguous()


@cached_table(64)
def _matrix_on(dim: int, seed: int, device: torch.device) -> Tensor:
    return _matrix_cpu(dim, seed).to(device)


def rotation_matrix(dim: int, seed: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """The orthogonal rotation R [dim, dim] float32; rotate(x) = x @ R.T."""
    if dim < 1:
        raise ValueError(f"`dim` must be a positive integer but got {dim}")
    return _matrix_on(dim, seed, torch.device(device))


def rotate(x: Tensor, seed: int = 0) -> Tensor:
    """R x for every row of ``x`` [..., d] float32."""
    return x @ rotation_matrix(x.shape[-1], seed, x.device).T


def unrotate(x: Tensor, seed: int = 0) -> Tensor:
    """R^T x for every row of ``x`` [..., d] float32: the exact inverse of :func:`rotate`."""
    return x @ rotation_matrix(x.shape[-1], seed, x.device)
