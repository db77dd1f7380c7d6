"""The driver builds a fixed grid once per (output times, stepping, dtype, device), boundedly."""

from __future__ import annotations

import torch

from nde_zoo.driver import loop
from nde_zoo.solvers import Stepping, fixed_path
from nde_zoo.strategies import Reversible
from tests.test_reversible import MLP


def test_the_grid_is_built_once_and_equals_a_fresh_one():
    loop._cached_grid.cache_clear()
    times, stepping, like = [0.0, 0.3, 1.0], Stepping.of(steps=7), torch.zeros(1, dtype=torch.float64)
    path, grid = loop.fixed_path_and_grid(times, stepping, like)
    again, same = loop.fixed_path_and_grid(times, stepping, like)
    assert same is grid and loop._cached_grid.cache_info().hits == 1
    fresh = fixed_path(times, stepping)
    assert list(path.times) == list(fresh.times) and list(path.sizes) == list(fresh.sizes)
    assert path.output_steps == fresh.output_steps
    assert grid.times.tolist() == list(fresh.times)[:-1] and grid.sizes.tolist() == list(fresh.sizes)


def test_the_cache_stays_bounded_and_long_grids_are_not_kept():
    loop._cached_grid.cache_clear()
    like = torch.zeros(1)
    for k in range(40):  # output times that move every call (ERNODE's sampled time)
        loop.fixed_path_and_grid([0.0, 0.5 + k / 100, 1.0], Stepping.of(steps=8), like)
    assert loop._cached_grid.cache_info().currsize == 16
    loop._cached_grid.cache_clear()
    loop.fixed_path_and_grid([0.0, 1.0], Stepping.of(steps=loop.CACHED_GRID_STEPS + 1), like)
    assert loop._cached_grid.cache_info().currsize == 0
    # few uniform steps, many output times: each output time is a grid point too
    many = torch.linspace(0.0, 1.0, loop.CACHED_GRID_STEPS + 1, dtype=torch.float64).tolist()
    path, _ = loop.fixed_path_and_grid(many, Stepping.of(steps=10), like)
    assert path.steps >= loop.CACHED_GRID_STEPS and loop._cached_grid.cache_info().currsize == 0


def test_a_grid_first_built_in_inference_mode_trains():
    """Lightning's sanity check validates under inference mode before the first training step."""
    loop._cached_grid.cache_clear()
    with torch.inference_mode():
        _, grid = loop.fixed_path_and_grid([0.0, 1.0], Stepping.of(steps=4), torch.zeros(1))
    assert not grid.times.is_inference() and not grid.sizes.is_inference()


def test_a_solutions_path_is_its_own(monkeypatch):
    """Solutions share the cached grid's tensors, never its Path: one solve's path edited leaves the next intact."""
    monkeypatch.setenv("NDE_ZOO_COMPILE_BACKEND", "aot_eager")
    field = MLP(dim=2, width=8).double()  # the strategy tests' field: field(t, y)

    strategy = Reversible("midpoint", steps=5, compile="strict")
    y0, ts = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    first = strategy.solve(field, y0, ts).path
    first.output_steps.append(99)
    first.times[0] = -1.0
    second = strategy.solve(field, y0, ts).path
    assert second.output_steps == [0, 5] and second.times[0] == 0.0
