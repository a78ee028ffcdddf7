"""The binning arithmetic and the edges derived from it (``lens_core.summaries._histogram``)."""

from __future__ import annotations

import math

import pytest
import torch

from lens_core.summaries import _histogram

F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).smallest_normal


def _ranges(dtype: torch.dtype) -> list[tuple[float, float]]:
    biggest = torch.finfo(dtype).max
    return [
        (-3.0, 2.5), (0.0, 1.0), (1000.0, 1000.01), (-1e-3, 1e30), (-biggest, biggest),
        (biggest / 2, biggest), (-biggest, -biggest), (2.0**30, 2.0**30), (7.25, 7.25),
        (0.0, 1e-44), (-1e-45, 1e-45), (F32_TINY, 2 * F32_TINY), (-5.0, -4.999),
    ]


@pytest.mark.parametrize("host", [False, True], ids=["accelerator search", "host search"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [1, 2, 7, 64])
def test_each_edge_is_the_smallest_value_binned_at_or_above_it(
    dtype: torch.dtype, bins: int, host: bool
) -> None:
    low, high = (torch.tensor(column, dtype=dtype) for column in zip(*_ranges(dtype), strict=True))
    g = torch.Generator().manual_seed(bins)  # and ranges of every scale, some across zero
    magnitude = 10.0 ** torch.randint(-30, 30, (60,), generator=g, dtype=torch.float64)
    start = torch.randn(60, generator=g, dtype=torch.float64) * magnitude
    low = torch.cat((low, start.to(dtype), torch.tensor([-1.0, -3.0], dtype=dtype)))
    end = start + torch.rand(60, generator=g, dtype=torch.float64) * magnitude.flip(0)
    high = torch.cat((high, end.to(dtype), torch.tensor([1.0, 3.0], dtype=dtype)))  # edges at 0
    rows = _histogram.frames(low, high, bins)
    edges = _histogram.edges(rows, bins, host=host)
    if host:  # the same edges as the search over the whole range
        assert torch.equal(edges, _histogram.edges(rows, bins))
    assert torch.isfinite(edges).all()
    assert (edges[:, 1:] >= edges[:, :-1]).all()  # in order
    assert (edges[:, 0] <= low).all()
    assert (edges[:, -1] >= high).all()
    assert (edges[:, 0] < edges[:, -1]).all()
    frame = (rows.unit[:, None], rows.origin[:, None], rows.scale[:, None])
    at = _histogram.positions(edges, *frame)
    below = _histogram.positions(torch.nextafter(edges, torch.tensor(-math.inf, dtype=dtype)), *frame)
    k = torch.arange(bins + 1, dtype=dtype)
    inner = slice(1, bins)
    assert (at[:, inner] >= k[inner]).all()  # the edge is binned at k or above
    lower = edges[:, inner] > edges[:, :1]  # and the float under it, inside the range, below k
    assert (below[:, inner][lower] < k[inner].expand_as(lower)[lower]).all()
    assert (at[:, 0] == 0).all()  # the first edge is the start of bin 0
    assert (at[:, -1] >= bins - 1).all()  # the last edge lands in the last bin (folded into it)


def test_unit_keeps_the_arithmetic_finite_at_both_ends_of_the_range() -> None:
    low = torch.tensor([-F32_MAX, 0.0, 1.0])
    high = torch.tensor([F32_MAX, 1e-44, 2.0])
    rows = _histogram.frames(low, high, 64)
    assert rows.unit.tolist() == [0.5, 2.0**64, 1.0]
    assert torch.isfinite(rows.scale).all()
    assert (rows.scale > 0).all()


def test_one_distinct_value_gets_a_unit_range_or_its_neighbouring_floats() -> None:
    value = torch.tensor([7.25, 2.0**30, F32_MAX, -F32_MAX])
    rows = _histogram.frames(value, value, 8)
    assert rows.low[0].item() == 6.75
    assert rows.high[0].item() == 7.75
    assert (rows.low[1:] < value[1:]).logical_or(rows.high[1:] > value[1:]).all()
    assert (rows.low <= value).all()
    assert (rows.high >= value).all()
    assert torch.isfinite(rows.low).all()
    assert torch.isfinite(rows.high).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_host_frame_of_one_tensor_is_the_one_frames_works_out(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    magnitude = 10.0 ** torch.randint(-40, 40, (400,), generator=g, dtype=torch.float64)
    low = torch.randn(400, generator=g, dtype=torch.float64) * magnitude
    high = low + torch.rand(400, generator=g, dtype=torch.float64) * magnitude.flip(0)
    extra_low, extra_high = (torch.tensor(column) for column in zip(*_ranges(dtype), strict=True))
    low, high = torch.cat((low, extra_low)).to(dtype), torch.cat((high, extra_high)).to(dtype)
    pairs = list(zip(low.tolist(), high.tolist(), strict=True))  # values of dtype, as .item() gives
    for bins in (1, 64, 65536):
        rows = _histogram.frames(low, high, bins)
        for i, (lo, hi) in enumerate(pairs):
            frame = _histogram.frame(lo, hi, bins, dtype)
            special = lo == hi or rows.unit[i].item() != 1  # one value; a width or scale overflowing
            assert (frame is None) == special, (lo, hi, bins)
            if frame is not None:
                assert frame == (rows.origin[i].item(), rows.scale[i].item()), (lo, hi, bins)


def test_edges_searched_block_by_block_equal_edges_searched_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(7, generator=g)
    rows = _histogram.frames(low, low + torch.rand(7, generator=g) * 5, 16)
    at_once = _histogram.edges(rows, 16)
    monkeypatch.setattr(_histogram, "_SEARCHED_AT_ONCE", 3 * 16)  # blocks of 3, 3 and 1 tensors
    assert torch.equal(_histogram.edges(rows, 16), at_once)
    assert torch.equal(_histogram.edges(rows, 16, host=True), at_once)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_host_search_of_ordinary_ranges_alone_equals_the_whole_search(dtype: torch.dtype) -> None:
    # narrow starts for every row: the rounds left must still reach the edges (float64 keys
    # are too long for float64 arithmetic, so the widths are counted in integers)
    low = torch.tensor([-3.0, 0.0, 1000.0, -2.0], dtype=dtype)
    high = torch.tensor([2.5, 1.0, 1000.01, -1.5], dtype=dtype)
    for bins in (2, 64, 1000):
        rows = _histogram.frames(low, high, bins)
        assert torch.equal(_histogram.edges(rows, bins, host=True), _histogram.edges(rows, bins))
