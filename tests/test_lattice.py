"""The E8 nearest-point routine and the orbit codebooks against brute force."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nexusquant_cache.codec import ball_codebook, nearest_d8, nearest_e8, shell_codebook
from nexusquant_cache.codec.lattice import _keys


def is_e8(points: torch.Tensor) -> torch.Tensor:
    """Row-wise membership in E8: all-integer or all-half-integer coordinates with an even sum."""
    doubled = 2 * points
    integral = (doubled == doubled.round()).all(-1)
    parity = torch.remainder(doubled, 2)
    same_coset = (parity == parity[..., :1]).all(-1)
    even_sum = torch.remainder(points.sum(-1), 2) == 0
    return integral & same_coset & even_sum


OFFSETS = torch.tensor(list(itertools.product([-1, 0, 1], repeat=8)), dtype=torch.float64)


def brute_force_e8(x: torch.Tensor) -> torch.Tensor:
    """Distance^2 to the nearest E8 point by exhaustive search.

    E8's covering radius is 1, so the nearest point lies within 1 of x in every coordinate:
    every integer or half-integer point of that box is a candidate (3^8 per coset).
    """
    best = torch.full(x.shape[:1], float("inf"), dtype=torch.float64)
    for shift in (0.0, 0.5):
        candidates = torch.round(x - shift)[:, None, :] + OFFSETS + shift  # [n, 6561, 8]
        distance = ((candidates - x[:, None, :]) ** 2).sum(-1)
        distance[~is_e8(candidates)] = float("inf")
        best = torch.minimum(best, distance.min(-1).values)
    return best


def check_nearest_e8(x: torch.Tensor):
    found = nearest_e8(x)
    assert is_e8(found).all()
    distance = ((found - x) ** 2).sum(-1)
    torch.testing.assert_close(distance, brute_force_e8(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 50.0])
def test_nearest_e8_equals_brute_force_on_random_points(scale):
    x = torch.randn(400, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale
    check_nearest_e8(x)


def test_nearest_e8_on_ties_and_lattice_points():
    generator = torch.Generator().manual_seed(2)
    on_grid = torch.randint(-6, 7, (300, 8), generator=generator).double() / 4  # many exact ties
    lattice = nearest_e8(torch.randn(100, 8, dtype=torch.float64, generator=generator) * 3)
    check_nearest_e8(torch.cat([on_grid, lattice]))
    assert torch.equal(nearest_e8(lattice), lattice)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-20, 20, allow_nan=False), min_size=8, max_size=8))
def test_nearest_e8_property(values):
    check_nearest_e8(torch.tensor([values], dtype=torch.float64))


def test_nearest_d8_re_rounds_the_largest_error():
    # (0.2, 0.9, 0, ...) rounds to an odd sum. Moving the coordinate with the largest error
    # (0.2 -> 1) costs 0.65; the earlier library moved one with the smallest error instead.
    x = torch.tensor([[0.2, 0.9, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    found = nearest_d8(x)
    assert torch.equal(found, torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64))
    assert ((found - x) ** 2).sum().item() == pytest.approx(0.65)


def test_codebook_shapes_and_membership():
    ball, shell = ball_codebook(), shell_codebook()
    assert len(ball.points) == 64_497 and ball.index_bits == 16
    assert len(shell.points) == 256 and shell.index_bits == 8
    for book in (ball, shell):
        assert is_e8(book.points.double()).all()
        assert len(torch.unique(book.points, dim=0)) == len(book.points)
        # Codes written by every release index the points in ascending key order; the lookup finds them.
        assert torch.all(_keys(book.points)[1:] > _keys(book.points)[:-1])
        assert torch.equal(book.index(book.points), torch.arange(len(book.points)))
    norms = (ball.points**2).sum(-1)
    assert (norms <= 10).sum() == 56_881  # the whole E8 ball of norm^2 <= 10
    assert norms.max() == 12


@pytest.mark.parametrize("book", [ball_codebook, shell_codebook], ids=["ball", "shell"])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.0, 10.0])
def test_orbit_search_equals_brute_force(book, scale):
    book = book()
    y = torch.randn(2000, 8, generator=torch.Generator().manual_seed(3)) * scale
    points, indices = book.nearest(y)
    assert torch.equal(book.points[indices], points)
    reference = book.nearest_reference(y)
    found = ((y - points) ** 2).sum(-1)
    best = ((y - reference) ** 2).sum(-1)
    torch.testing.assert_close(found, best, rtol=0, atol=1e-4)


def test_nearest_per_orbit_equals_brute_force_within_each_orbit():
    book = shell_codebook()
    y = torch.randn(500, 8, generator=torch.Generator().manual_seed(4))
    proposals = book.nearest_per_orbit(y)  # [P, m, 8]
    sorted_points = book.points.abs().sort(-1, descending=True).values
    for pattern, proposal in zip(book.patterns, proposals):
        orbit = book.points[(sorted_points == pattern).all(-1)]
        best = ((y[:, None, :] - orbit[None]) ** 2).sum(-1).min(-1).values
        torch.testing.assert_close(((y - proposal) ** 2).sum(-1), best, rtol=0, atol=1e-5)
