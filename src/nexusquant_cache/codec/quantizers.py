"""Fixed-rate quantizers of 8-number blocks: E8 lattice codebooks and the Lloyd-Max baseline.

Both take blocks already rotated and divided by a per-vector scale, so that each number is
roughly a unit Gaussian, and both spend exactly ``bits`` bits per number (one ``8 * bits``-bit
word per block). The encoder in :mod:`.encoding` owns rotation, scales and packing.

E8 at 2 bits is the 64,497-point ball codebook. At 3 and 4 bits a second stage codes the
residual at a fixed fraction ``residual`` of the first stage's scale, so one scale per vector
serves both: 3 bits = shell (8 bits) then ball (16 bits), 4 bits = ball then ball. At 3 bits
the first stage is searched jointly with the second: each of the shell's 3 orbits proposes its
nearest point and the pair with the smallest total error wins (4% lower error than greedy, for
3x the search). The loads and residual fractions minimise the mean squared error on Gaussian
data (grid searches recorded in docs/codec.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tables import cached_table
from .lattice import OrbitCodebook, ball_codebook, shell_codebook
from .packing import unpack_words

__all__ = ["E8Quantizer", "ScalarQuantizer", "quantizer"]


class E8Quantizer:
    """E8 lattice codebooks, one or two stages."""

    _LOAD = {2: 1.0, 3: 2.0, 4: 1.15}  # codebook units per unit of data RMS
    _RESIDUAL = {3: 0.28, 4: 0.25}  # second-stage scale / first-stage scale

    def __init__(self, bits: int):
        self.bits = bits
        self.load = self._LOAD[bits]
        self.residual = self._RESIDUAL.get(bits, 0.0)
        self.stages: list[OrbitCodebook] = {
            2: [ball_codebook()],
            3: [shell_codebook(), ball_codebook()],
            4: [ball_codebook(), ball_codebook()],
        }[bits]
        self._first_bits = self.stages[0].index_bits

    def quantize(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks y [m, 8] float32 -> (reconstruction [m, 8], words [m] int64)."""
        first_book = self.stages[0].to(y.device)
        if len(self.stages) == 1:
            return first_book.nearest(y)
        second_book = self.stages[1].to(y.device)
        if self.bits == 4:  # greedy: the first stage's nearest point, then the residual's
            first, first_words = first_book.nearest(y)
            second, second_words = second_book.nearest((y - first) / self.residual)
            return first.add(second, alpha=self.residual), first_words | (second_words << self._first_bits)
        proposals = first_book.nearest_per_orbit(y)  # [k, m, 8]: joint search over the first stage's orbits
        seconds = [second_book.nearest((y - first) / self.residual) for first in proposals]
        points = proposals.add(torch.stack([second for second, _ in seconds]), alpha=self.residual)
        choice = ((y - points) ** 2).sum(-1).argmin(0)  # [m]
        rows = torch.arange(len(y), device=y.device)
        second_words = torch.stack([words for _, words in seconds])[choice, rows]
        first_words = first_book.index(proposals[choice, rows])
        return points[choice, rows], first_words | (second_words << self._first_bits)

    @property
    def largest_block_norm(self) -> float:
        """The largest norm a reconstructed block can have."""
        norms = [float(stage.points.norm(dim=-1).max()) for stage in self.stages]
        return norms[0] + (self.residual * norms[1] if len(norms) > 1 else 0.0)

    def is_word(self, words: Tensor) -> Tensor:
        """Which words (int64, any shape) index a codeword in every stage."""
        sizes = [len(stage.points) for stage in self.stages]
        if len(sizes) == 1:
            return words < sizes[0]
        return ((words & ((1 << self._first_bits) - 1)) < sizes[0]) & ((words >> self._first_bits) < sizes[1])

    def dequantize(self, words: Tensor) -> Tensor:
        """words [m] int64 -> blocks [m, 8] float32."""
        first_book = self.stages[0].to(words.device)
        if len(self.stages) == 1:
            return first_book.points[words]  # a single stage's words are its indices
        first = first_book.points[words & ((1 << self._first_bits) - 1)]
        second = self.stages[1].to(words.device).points[words >> self._first_bits]
        return first.add_(second, alpha=self.residual)

    def units(self, codes: list[Tensor], out: Tensor) -> tuple[float, float]:
        """Write the codewords of packed ``codes`` (pieces [..., T_i, d * bits / 8], read as one
        joined along T) into ``out`` [m, d] (any floating dtype) in integer units; returns
        ``(unit, bias)``: a block's point is ``unit * (out - bias)``. At 2 and 4 bits every value
        is an integer below 128, exact in float16 and bfloat16 too; at 3 bits the residual stage's
        0.28 makes them fractions, rounded to ``out``'s dtype. Each stage is one gather of 8-byte
        table rows (a row holds a codeword's 8 coordinates, doubled, as int8): no float detour,
        no [m, 8] index tensors."""
        m = out.shape[0]
        if self.bits == 2:  # one 16-bit index per block
            out.view(m, -1).copy_(_gathered(self.stages[0], 0, _indices16(codes)).view(torch.int8).view(m, -1))
            return 0.5, 0.0
        if self.bits == 4:  # two 16-bit indices per block (first stage first); c = c1 + c2 / 4
            rows = _gathered(self.stages[0], _BIAS, _indices16(codes)).view(-1, 2)
            # 8c = 4 (2 c1) + 2 c2: biased lanes (2c + 8 in 0..14) add without carries between the bytes of a row.
            combined = torch.add(rows[:, 1], rows[:, 0], alpha=4)
            out.view(m, -1).copy_(combined.view(torch.uint8).view(m, -1))
            return 0.125, 5 * _BIAS
        # 3 bits: an 8-bit shell index, then a 16-bit ball index, per 3-byte block
        blocks = _joined(codes).view(m, -1, 3)
        first = blocks[..., 0].reshape(-1).to(torch.int32)
        second = blocks[..., 1:].reshape(-1, 2).to(torch.int32)
        second = second[:, 0].bitwise_or_(second[:, 1].bitwise_left_shift(8))
        view = out.view(m, -1)
        view.copy_(_gathered(self.stages[0], 0, first).view(torch.int8).view(m, -1))
        view.add_(_gathered(self.stages[1], 0, second).view(torch.int8).view(m, -1), alpha=self.residual)
        return 0.5, 0.0


_BIAS = 8  # added to every doubled coordinate (|2c| <= 6) in the 4-bit tables: non-negative lanes


@cached_table(16)
def _row_table(book: OrbitCodebook, bias: int, device: torch.device) -> Tensor:
    """[n] int64: codeword i's doubled coordinates plus ``bias`` as 8 bytes (int8 lanes)."""
    doubled = (2 * book.points).round().to(torch.int16) + bias
    rows = doubled.to(torch.int8 if bias == 0 else torch.uint8).contiguous().view(torch.int64).view(-1)
    return rows.to(device)


def _indices16(codes: list[Tensor]) -> Tensor:
    """The little-endian 16-bit words of ``codes`` (pieces [..., T_i, 2k], joined along T) as
    int32 [m * k] (through int16, which every device supports, unlike uint16)."""
    return _joined(codes).view(torch.int16).reshape(-1).to(torch.int32).bitwise_and_(0xFFFF)


def _joined(codes: list[Tensor]) -> Tensor:
    """The pieces joined along T, flattened to [m, bytes] (no copy for one contiguous piece).
    One ``cat``: joining straight into the widened int32 (``cat(out=)``) is slower on CPU, as
    torch copies piece by piece through temporaries."""
    joined = codes[0] if len(codes) == 1 else torch.cat(codes, -2)
    return joined.reshape(-1, joined.shape[-1])


def _gathered(book: OrbitCodebook, bias: int, index: Tensor) -> Tensor:
    """Rows ``index`` of the book's table (index_select: several times faster than advanced indexing on CPU)."""
    return _row_table(book, bias, index.device).index_select(0, index)


@cached_table(None)
def lloyd_max_levels(bits: int, iterations: int = 2000) -> Tensor:
    """The 2^bits MSE-optimal (Lloyd-Max) levels for a unit Gaussian, float64, ascending."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    levels = torch.linspace(-2.0, 2.0, 2**bits, dtype=torch.float64)
    for _ in range(iterations):
        edges = torch.cat([torch.tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2, torch.tensor([math.inf])])
        density = normal.log_prob(edges.clamp(-40, 40)).exp()
        mass = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
        levels = (density[:-1] - density[1:]) / mass  # centroid of each cell
    return levels


@dataclass
class ScalarQuantizer:
    """Lloyd-Max scalar levels per number: the honest baseline, with the same bits and scale."""

    bits: int
    load = 1.0

    def __post_init__(self):
        self.levels = lloyd_max_levels(self.bits).float()
        self.thresholds = (self.levels[1:] + self.levels[:-1]) / 2
        self._shifts = self.bits * torch.arange(8)

    def quantize(self, y: Tensor) -> tuple[Tensor, Tensor]:
        codes = torch.bucketize(y, self.thresholds.to(y.device))
        shifts = self._shifts.to(y.device)
        return self.levels.to(y.device)[codes], (codes << shifts).sum(-1)

    @property
    def largest_block_norm(self) -> float:
        return math.sqrt(8) * float(self.levels.abs().max())

    def is_word(self, words: Tensor) -> Tensor:
        return torch.ones_like(words, dtype=torch.bool)  # every bits-wide field is a level

    def dequantize(self, words: Tensor) -> Tensor:
        codes = (words.unsqueeze(-1) >> self._shifts.to(words.device)) & (2**self.bits - 1)
        return self.levels.to(words.device)[codes]

    def units(self, codes: list[Tensor], out: Tensor) -> tuple[float, float]:
        """As :meth:`E8Quantizer.units`, with unit 1: the levels are not integers."""
        out.copy_(self.dequantize(unpack_words(_joined(codes), self.bits)).view_as(out))
        return 1.0, 0.0


@cached_table(None)
def quantizer(method: str, bits: int) -> E8Quantizer | ScalarQuantizer:
    return E8Quantizer(bits) if method == "e8" else ScalarQuantizer(bits)
