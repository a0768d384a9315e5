"""The E8 lattice: exact nearest-point search and the fixed-rate codebooks built from it.

E8 is the union of D8 (integer vectors with an even coordinate sum) and D8 + 1/2 (all
coordinates in Z + 1/2, again with an even sum). Its nearest point to any x is the nearer of
the nearest points of the two cosets (Conway & Sloane, *Sphere Packings*, ch. 20):

* nearest D8 point: round every coordinate; if the sum is odd, re-round the coordinate with
  the LARGEST rounding error the other way (it is the cheapest one to move);
* nearest D8 + 1/2 point: the same, applied to x - 1/2, then shifted back.

A fixed-rate codebook is a finite set of E8 points with an index. Ours are unions of whole
*orbits* under coordinate permutations and sign changes (each orbit is one sorted pattern of
absolute values), which makes the exact nearest codeword cheap: sort |y|, align it with every
pattern (the rearrangement inequality says sorted-to-sorted is the best permutation), take the
signs of y, and for half-integer patterns, whose sign flips change the sum's parity, pay for
flipping the smallest aligned product when the parity is wrong. This is about 25 multiply-adds
per pattern instead of a scan over 2^16 codewords, and it equals brute force (see the tests).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tables import cached_table

__all__ = ["OrbitCodebook", "nearest_d8", "nearest_e8", "ball_codebook", "shell_codebook"]


def nearest_d8(x: Tensor) -> Tensor:
    """Nearest point of D8 to every row of ``x`` [..., 8] (float)."""
    rounded = torch.round(x)
    error = x - rounded
    odd = torch.remainder(rounded.sum(-1, keepdim=True), 2) != 0
    worst = error.abs().argmax(-1, keepdim=True)
    step = torch.where(error.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    return rounded.scatter_add(-1, worst, step * odd)


def nearest_e8(x: Tensor) -> Tensor:
    """Nearest point of E8 to every row of ``x`` [..., 8] (float); ties resolve to D8."""
    integer = nearest_d8(x)
    half = nearest_d8(x - 0.5) + 0.5
    closer_half = ((x - half) ** 2).sum(-1, keepdim=True) < ((x - integer) ** 2).sum(-1, keepdim=True)
    return torch.where(closer_half, half, integer)


def _keys(points: Tensor) -> Tensor:
    """A unique int64 key per point of (Z/2)^8 with |coordinate| <= 3 (base-13 digits of 2x):
    the codebooks index their points in ascending key order.

    The digits stay below 2^31 and are summed exactly in float64, which is faster than int64.
    """
    digits = 2 * points.double() + 6
    return (digits @ (13.0 ** torch.arange(8, dtype=torch.float64, device=points.device))).long()


_HALF_KEYS = 13**4  # keys of 4 coordinates (base-13 digits of 2x + 6)


def _half_keys(points: Tensor) -> Tensor:
    """The keys [m, 2] int64 of the first and last four coordinates of ``points`` [m, 8] (any
    point of (Z/2)^8 with |coordinate| <= 3), from one small float32 matrix product (exact:
    every sum stays below 2^24)."""
    weights = torch.zeros(8, 2, device=points.device)
    weights[:4, 0] = weights[4:, 1] = 2 * 13.0 ** torch.arange(4, device=points.device)
    digit_offset = 6.0 * sum(13**i for i in range(4))  # the + 6 of every digit
    return torch.addmm(weights.new_full((1, 2), digit_offset), points, weights).long()


@cached_table(1)
def _permutations() -> Tensor:
    return torch.tensor(list(itertools.permutations(range(8))))  # [40320, 8]


def _orbit(pattern: tuple[float, ...]) -> Tensor:
    """All E8 points whose sorted absolute values equal ``pattern`` [n, 8] float64."""
    base = torch.tensor(pattern, dtype=torch.float64)
    arranged = torch.unique(base[_permutations()], dim=0)
    signs = torch.cartesian_prod(*[torch.tensor([1.0, -1.0], dtype=torch.float64)] * 8)
    points = torch.unique((arranged[:, None, :] * signs[None]).reshape(-1, 8), dim=0)
    return points[torch.remainder(points.sum(-1), 2) == 0]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per codebook
class OrbitCodebook:
    """A codebook that is a union of E8 sign/permutation orbits.

    Attributes:
        patterns: [P, 8] float32, each orbit's absolute values sorted in descending order.
        half: [P] bool, whether the orbit lies in D8 + 1/2 (its sign flips are parity-bound).
        points: [n, 8] float32, every codeword; the row is the codeword's index.
        half_ids: [13^4] int64, a dense id for every key of four coordinates that occurs in a
            codeword (-1: none): a codeword's index is found from the ids of its two halves by
            two table lookups, without searching.
        pair_index: [K, K] int32, the index of the codeword whose halves have ids (a, b)
            (-1: none), K the number of distinct halves (1,113 in the ball codebook: 5 MB).
        index_bits: bits per index, ``ceil(log2(n))``.
    """

    patterns: Tensor
    half: Tensor
    points: Tensor
    half_ids: Tensor
    pair_index: Tensor
    index_bits: int

    @classmethod
    def from_patterns(cls, patterns: list[tuple[float, ...]]) -> "OrbitCodebook":
        points = torch.cat([_orbit(p) for p in patterns])
        points = points[_keys(points).argsort()].float()  # the index order of every code written so far
        halves = _half_keys(points)
        distinct = halves.unique()
        half_ids = torch.full((_HALF_KEYS,), -1, dtype=torch.int64)
        half_ids[distinct] = torch.arange(len(distinct))
        pair_index = torch.full((len(distinct), len(distinct)), -1, dtype=torch.int32)
        ids = half_ids[halves]
        pair_index[ids[:, 0], ids[:, 1]] = torch.arange(len(points), dtype=torch.int32)
        pattern_tensor = torch.tensor(patterns, dtype=torch.float32)
        return cls(
            patterns=pattern_tensor,
            half=torch.remainder(pattern_tensor[:, 0], 1) != 0,
            points=points,
            half_ids=half_ids,
            pair_index=pair_index,
            index_bits=(len(points) - 1).bit_length(),
        )

    def to(self, device: torch.device) -> "OrbitCodebook":
        """This codebook on ``device`` (copied once per device, then reused)."""
        return self if self.points.device == device else _on_device(self, device)

    def nearest(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Exact nearest codeword to every row of ``y`` [m, 8] float32.

        Returns (points [m, 8] float32, indices [m] int64).
        """
        gain, order, negatives_odd = self._align(y)
        points = self._place(y, order, gain.argmax(-1), negatives_odd)
        return points, self.index(points)

    def nearest_per_orbit(self, y: Tensor) -> Tensor:
        """The nearest point of every orbit to every row of ``y`` [m, 8]: [P, m, 8] float32."""
        _, order, negatives_odd = self._align(y)
        orbits = torch.arange(len(self.patterns), device=y.device)
        return torch.stack([self._place(y, order, orbit.expand(len(y)), negatives_odd) for orbit in orbits])

    def index(self, points: Tensor) -> Tensor:
        """Index [m] int64 of codewords ``points`` [m, 8]."""
        ids = self.half_ids[_half_keys(points)]
        return self.pair_index[ids[:, 0], ids[:, 1]].long()

    def _align(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per pattern, ||y||^2 - distance^2 to its best-aligned point [m, P], the sorting
        permutation of |y| [m, 8], and the parity of the count of negative signs [m]."""
        magnitudes, order = y.abs().sort(-1, descending=True)
        gain = magnitudes @ (2 * self.patterns.T) - (self.patterns**2).sum(-1)
        # A half-integer pattern with the signs of y has an odd sum exactly when the count of
        # negative signs and sum(a) differ in parity; it must then flip the smallest aligned
        # product (at sorted position 7), which costs 4 a_7 |y|_7.
        negatives_odd = (y < 0).sum(-1) % 2  # [m]
        gain.addcmul_(magnitudes[:, 7:8], self._flip_cost()[negatives_odd], value=-1)
        return gain, order, negatives_odd

    def _wrong_parity(self) -> Tensor:
        """[2, P] bool: whether pattern p has the wrong sum parity given an even / odd count of
        negative signs."""
        half_sum_odd = (self.patterns.sum(-1).round().long() % 2) == 1
        return torch.stack([self.half & half_sum_odd, self.half & ~half_sum_odd])

    def _flip_cost(self) -> Tensor:
        """[2, P] float: the parity flip's cost per unit of the smallest magnitude."""
        return self._wrong_parity() * (4 * self.patterns[:, 7])

    def _place(self, y: Tensor, order: Tensor, pattern: Tensor, negatives_odd: Tensor) -> Tensor:
        """The point of orbit ``pattern`` [m] aligned with y: values by rank, signs of y."""
        values = self.patterns[pattern]
        flip = self._wrong_parity()[negatives_odd, pattern]
        values[:, 7] = torch.where(flip, -values[:, 7], values[:, 7])
        points = torch.empty_like(y).scatter_(-1, order, values)
        return torch.where(y < 0, -points, points)

    def nearest_reference(self, y: Tensor) -> Tensor:
        """Brute-force nearest codeword (the test oracle): argmax of 2 y.c - |c|^2 over all c."""
        scores = 2 * y.double() @ self.points.double().T - (self.points.double() ** 2).sum(-1)
        return self.points[scores.argmax(-1)]


@cached_table(8)
def _on_device(book: OrbitCodebook, device: torch.device) -> OrbitCodebook:
    tensors = (book.patterns, book.half, book.points, book.half_ids, book.pair_index)
    return OrbitCodebook(*(t.to(device) for t in tensors), book.index_bits)


def _patterns(values: list[float], max_norm2: float) -> list[tuple[float, ...]]:
    """Sorted absolute-value patterns of E8 points built from ``values`` with norm^2 <= max_norm2."""
    found = []
    for combo in itertools.combinations_with_replacement(sorted(values, reverse=True), 8):
        integer = float(combo[0]).is_integer()
        if sum(v * v for v in combo) <= max_norm2 and (not integer or sum(combo) % 2 == 0):
            found.append(tuple(combo))
    return found


@cached_table(1)
def ball_codebook() -> OrbitCodebook:
    """64,497 E8 points in 16-bit indices: the whole ball of norm^2 <= 10 (56,881 points) plus
    the two orbits of the norm^2 = 12 shell that still fit, (2,2,2,0,0,0,0,0) and
    (3/2 x5, 1/2 x3). A union of whole orbits cannot reach exactly 2^16 points (the origin is
    the only odd-sized orbit), so 1.6% of the index space stays unused: 0.003 bits per number."""
    patterns = _patterns([0, 1, 2, 3], 10) + _patterns([0.5, 1.5, 2.5], 10)
    patterns += [(2, 2, 2, 0, 0, 0, 0, 0), (1.5, 1.5, 1.5, 1.5, 1.5, 0.5, 0.5, 0.5)]
    return OrbitCodebook.from_patterns(patterns)


@cached_table(1)
def shell_codebook() -> OrbitCodebook:
    """256 E8 points in 8-bit indices: the 240 minimal vectors plus the 16 points (+-2, 0^7)."""
    return OrbitCodebook.from_patterns([(1, 1, 0, 0, 0, 0, 0, 0), (0.5,) * 8, (2, 0, 0, 0, 0, 0, 0, 0)])
