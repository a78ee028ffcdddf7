"""Summaries against plain numpy references, and the promise of one device-to-host transfer.

The CPU has its own code (it reads results as they come); the accelerators' code runs here on CPU
tensors too, against the same references.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lens_core import summaries as summaries_module
from lens_core.summaries import Histogram, TensorSummary, _device, _host, _passes, summarize
from lens_core.summaries.summary import no_finite_values

NAN, INF = math.nan, math.inf


def _values(tensor: torch.Tensor) -> np.ndarray:
    """The values as the summary sees them: float64 stays float64, the rest becomes float32."""
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.detach().to(wide).reshape(-1).numpy()


def _check_against_numpy(tensor: torch.Tensor, summary: TensorSummary, bins: int) -> None:
    values = _values(tensor)
    finite = values[np.isfinite(values)].astype(np.float64)
    assert summary.numel == tensor.numel()
    assert summary.nan_count == int(np.isnan(values).sum())
    assert summary.inf_count == int(np.isinf(values).sum())
    assert summary.finite_count == finite.size
    rtol = 1e-12 if tensor.dtype == torch.float64 else 1e-5
    assert summary.min == finite.min()  # extremes are exact
    assert summary.max == finite.max()
    assert summary.mean == pytest.approx(finite.mean(), rel=rtol, abs=1e-6)
    assert summary.std == pytest.approx(finite.std(), rel=rtol, abs=1e-6)
    assert summary.mean_abs == pytest.approx(np.abs(finite).mean(), rel=rtol)
    assert summary.l2_norm == pytest.approx(np.sqrt((finite**2).sum()), rel=rtol)
    assert summary.zero_fraction == (finite == 0).mean()
    edges = np.array(summary.histogram.edges)
    assert len(edges) == bins + 1
    assert np.all(np.diff(edges) >= 0)
    if finite.min() < finite.max():
        assert (edges[0], edges[-1]) == (finite.min(), finite.max())
    elif abs(finite.min()) < 2**20:  # numpy's convention for one distinct value: a unit range
        assert (edges[0], edges[-1]) == (finite.min() - 0.5, finite.max() + 0.5)
    else:  # where 0.5 rounds away, the neighbouring floats
        assert edges[0] < edges[-1]
        assert edges[0] <= finite.min() <= edges[-1]
    reference, _ = np.histogram(finite, bins=edges)
    assert list(summary.histogram.counts) == reference.tolist()  # exact, bin for bin
    assert sum(summary.histogram.counts) == finite.size


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with_specials = torch.randn(50, generator=g)
    with_specials[[3, 7, 9]] = torch.tensor([NAN, INF, -INF])
    with_specials[[11, 12]] = 0.0
    relu = torch.randn(4, 8, 5, generator=g).relu()
    return {
        "normal": torch.randn(3, 7, 11, generator=g),
        "relu_sparse": relu,
        "with_nan_inf": with_specials,
        "float64": torch.randn(300, generator=g, dtype=torch.float64) * 1e3,
        "bfloat16": (torch.randn(64, 9, generator=g) * 10).to(torch.bfloat16),
        "float16": torch.randn(100, generator=g).half(),
        "int64": torch.randint(-50, 50, (7, 13), generator=g),
        "uint8": torch.randint(0, 255, (40,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(33, generator=g) > 0.3,
        "constant": torch.full((6, 2), 3.25),
        "single": torch.tensor([-2.0]),
        "scalar": torch.tensor(7.5),
        "transposed": torch.randn(9, 4, generator=g).t(),
        "requires_grad": torch.randn(10, generator=g, requires_grad=True) * 2,
        "ties_on_edges": torch.arange(0, 65, dtype=torch.float32),  # every value is an edge
        "huge_range": torch.tensor([-3.0e38, 0.0, 1.0, 3.0e38]),
        "overflowing_sums": torch.tensor([3.0e38] * 40 + [-1.0e38] * 20 + [5.0]),
        "negative": -torch.randn(200, generator=g).abs(),
        "offset_noise": 1000 + torch.randn(500, generator=g) * 1e-3,  # std far below the mean
        "subnormal_range": torch.tensor([1, 2, 3, 5, 2], dtype=torch.int32).view(torch.float32),
        "huge_constant": torch.full((5,), 2.0**30),
        "largest_constant": torch.full((3,), torch.finfo(torch.float32).max),
        "signed_zeros": torch.tensor([-0.0, 0.0, 1.0, -1.0]),
        "int64_large": torch.tensor([2**40, -(2**40) + 3, 7, 2**53 + 1]),
        "mostly_zeros": torch.where(torch.rand(3000, generator=g) < 0.9, 0.0, torch.rand(3000, generator=g)),
        "expanded": torch.randn(3, 1, generator=g).expand(3, 5),
    }


Summarize = Callable[..., dict[str, TensorSummary]]


@pytest.fixture(params=["cpu", "cpu one by one", "accelerator code"])
def summarize_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Summarize:
    """``summarize`` through each code path: the CPU's (small tensors together, or every tensor
    on its own), and the accelerators' (run here on CPU tensors: no host read, one transfer)."""
    if request.param == "cpu one by one":
        monkeypatch.setattr(_host, "SMALL", 0)
    if request.param != "accelerator code":
        return summarize

    def on_accelerator_code(tensors: dict[str, torch.Tensor], bins: int = 64) -> dict[str, TensorSummary]:
        kept = {name: t.detach() for name, t in tensors.items() if t.numel()}
        found = dict(zip(kept, _device.summarize_on_device(list(kept.values()), bins), strict=True))
        return {name: found.get(name, no_finite_values(0, 0, 0)) for name in tensors}
    return on_accelerator_code


@pytest.mark.parametrize("bins", [1, 7, 64, 600])
def test_every_statistic_and_bin_matches_numpy(bins: int, summarize_on: Summarize) -> None:
    tensors = {name: t for name, t in _cases().items() if t.numel()}
    summaries = summarize_on(tensors, bins=bins)
    assert list(summaries) == list(tensors)
    for name, tensor in tensors.items():
        try:
            _check_against_numpy(tensor, summaries[name], bins)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


def test_the_code_paths_give_the_same_histograms_and_extremes(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {name: t for name, t in _cases().items() if t.numel()}
    together = summarize(tensors)
    on_accelerator_code = _device.summarize_on_device([t.detach() for t in tensors.values()], 64)
    monkeypatch.setattr(_host, "SMALL", 0)
    one_by_one = summarize(tensors)
    for (name, a), c in zip(together.items(), on_accelerator_code, strict=True):
        b = one_by_one[name]
        assert a.histogram == b.histogram == c.histogram, name
        assert (a.min, a.max, a.zero_fraction) == (b.min, b.max, b.zero_fraction), name
        assert (a.min, a.max, a.zero_fraction) == (c.min, c.max, c.zero_fraction), name


def test_a_summary_does_not_depend_on_the_other_tensors_of_the_call(summarize_on: Summarize) -> None:
    tensors = {name: t for name, t in _cases().items() if t.numel()}
    together = summarize_on(tensors)
    for name, tensor in tensors.items():
        alone = summarize_on({name: tensor})[name]
        assert _same(alone, together[name], rel=1e-12), name  # sums may run in another order


def test_summaries_in_chunks_equal_summaries_in_one_go(
    monkeypatch: pytest.MonkeyPatch, summarize_on: Summarize
) -> None:
    tensor = torch.randn(10_001, generator=torch.Generator().manual_seed(1)).relu()
    tensor[[5, 5000, 9999]] = torch.tensor([NAN, INF, NAN])
    whole = summarize_on({"x": tensor})["x"]
    monkeypatch.setattr(_passes, "CHUNK", 997)
    chunked = summarize_on({"x": tensor})["x"]
    assert _same(chunked, whole, rel=1e-5)  # sums in another order
    _check_against_numpy(tensor, chunked, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_on_and_next_to_every_edge_are_binned_as_numpy_bins_them(
    dtype: torch.dtype, summarize_on: Summarize
) -> None:
    g = torch.Generator().manual_seed(2)
    samples = {
        "small": torch.randn(300, generator=g, dtype=dtype),
        "normal": torch.randn(5000, generator=g, dtype=dtype),
        "narrow_far_from_zero": 1000 + torch.rand(5000, generator=g, dtype=dtype) * 1e-2,
        "wide": torch.randn(5000, generator=g, dtype=dtype) * 1e30,
    }
    for name, values in samples.items():
        edges = torch.tensor(summarize_on({name: values}, bins=37)[name].histogram.edges, dtype=dtype)
        around = torch.cat((edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)))
        # inside the range, so that the extremes, and with them the edges, stay the same
        stressed = torch.cat((values, around.clamp(values.min(), values.max())))
        summary = summarize_on({name: stressed}, bins=37)[name]
        assert summary.histogram.edges == tuple(edges.tolist()), name
        _check_against_numpy(stressed, summary, 37)


def test_float64_statistics_do_not_overflow_near_the_largest_double(summarize_on: Summarize) -> None:
    values = torch.tensor([-1.5e308, 1.7e308, 0.0, 1.0e308], dtype=torch.float64)
    summary = summarize_on({"x": values})["x"]
    scaled = values.numpy() / 2**1000  # numpy's own sums would overflow
    assert summary.mean == pytest.approx(scaled.mean() * 2**1000, rel=1e-12)
    assert summary.std == pytest.approx(scaled.std() * 2**1000, rel=1e-12)
    assert summary.l2_norm == math.inf  # the true norm is past the largest double
    reference, _ = np.histogram(values.numpy(), bins=np.array(summary.histogram.edges))
    assert list(summary.histogram.counts) == reference.tolist()


@pytest.mark.parametrize("size", [100, 3000])  # in the batch of small tensors, and on its own
@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, 1e-25), (torch.float32, 1e30), (torch.bfloat16, 1e-30), (torch.float64, 1e-170)],
)
def test_tiny_and_huge_values_keep_the_digits_of_their_statistics(
    summarize_on: Summarize, dtype: torch.dtype, scale: float, size: int
) -> None:
    # Their squares under- or overflow unless the sums are scaled (relative tolerance only here).
    normal = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = (normal * scale).to(dtype)
    summary = summarize_on({"x": values})["x"]
    unscaled = values.double().numpy() / scale
    assert summary.mean == pytest.approx(unscaled.mean() * scale, abs=1e-7 * scale)  # cancels
    assert summary.std == pytest.approx(unscaled.std() * scale, rel=1e-6)
    assert summary.l2_norm == pytest.approx(np.sqrt((unscaled**2).sum()) * scale, rel=1e-6)


def test_the_std_of_millions_of_float32_values_keeps_its_digits(summarize_on: Summarize) -> None:
    values = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) + 3
    summary = summarize_on({"x": values})["x"]
    wide = values.double().numpy()
    assert summary.std == pytest.approx(wide.std(), rel=1e-6)
    assert summary.l2_norm == pytest.approx(np.sqrt((wide**2).sum()), rel=1e-6)


def test_views_of_the_same_elements_are_summarised_once_and_alike() -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    views = {"x": x, "t": x.t(), "flat": x.reshape(-1), "grad": x.detach(), "tail": x[1:]}
    summaries = summarize(views)
    assert summaries["t"] == summaries["flat"] == summaries["grad"] == summaries["x"]
    assert summaries["tail"].numel == 20
    assert summaries["tail"] != summaries["x"]


@pytest.mark.parametrize(
    ("tensor", "nans", "infs"),
    [
        (torch.empty(0), 0, 0),
        (torch.empty(3, 0, 2, dtype=torch.int32), 0, 0),
        (torch.tensor([NAN, NAN]), 2, 0),
        (torch.tensor([INF, -INF, NAN]), 1, 2),
        (torch.tensor([NAN], dtype=torch.bfloat16), 1, 0),
    ],
)
def test_no_finite_value_gives_nan_statistics_and_an_empty_histogram(
    tensor: torch.Tensor, nans: int, infs: int, summarize_on: Summarize
) -> None:
    summary = summarize_on({"x": tensor, "ok": torch.ones(2)})["x"]
    assert (summary.numel, summary.nan_count, summary.inf_count) == (tensor.numel(), nans, infs)
    assert summary.finite_count == 0
    averages = (summary.mean, summary.std, summary.mean_abs, summary.zero_fraction)
    assert all(math.isnan(value) for value in (*averages, summary.min, summary.max))
    assert summary.l2_norm == 0.0
    assert summary.histogram == Histogram((), ())


def test_an_empty_mapping_gives_an_empty_dict() -> None:
    assert summarize({}) == {}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="bins=0"):
        summarize({"x": torch.ones(2)}, bins=0)
    with pytest.raises(ValueError, match="bins=True"):
        summarize({"x": torch.ones(2)}, bins=True)
    with pytest.raises(ValueError, match="bins=65537: use an int from 1 to 65536"):
        summarize({"x": torch.ones(2)}, bins=65537)
    with pytest.raises(TypeError, match=r"tensors\['x'\] is a list"):
        summarize({"x": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="complex"):
        summarize({"z": torch.ones(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="mapping"):
        summarize([torch.ones(2)])  # type: ignore[arg-type]


def test_to_dict_is_strict_json_and_round_trips() -> None:
    summaries = summarize({
        "normal": torch.randn(20), "nan": torch.tensor([NAN]), "empty": torch.empty(0),
        "inf": torch.tensor([INF, 1.0]),
    }, bins=5)
    for name, summary in summaries.items():
        text = json.dumps(summary.to_dict(), allow_nan=False)  # no bare NaN/Infinity tokens
        back = TensorSummary.from_dict(json.loads(text))
        assert _same(back, summary), name


def _same(a: TensorSummary, b: TensorSummary, rel: float = 0.0) -> bool:
    """Equality that treats NaN as equal to NaN; the sums' statistics within ``rel``."""
    def norm(value: Any) -> Any:
        return "nan" if isinstance(value, float) and math.isnan(value) else value
    sums = {"mean", "std", "mean_abs", "l2_norm"}
    fields = [f for f in TensorSummary.__dataclass_fields__ if f not in sums and f != "histogram"]
    close = all(
        norm(getattr(a, f)) == norm(getattr(b, f)) or getattr(a, f) == pytest.approx(getattr(b, f), rel=rel)
        for f in sums
    )
    exact = all(norm(getattr(a, f)) == norm(getattr(b, f)) for f in fields)
    return close and exact and a.histogram == b.histogram


def test_from_dict_names_what_is_wrong() -> None:
    data = summarize({"x": torch.randn(5)})["x"].to_dict()
    del data["std"]
    with pytest.raises(ValueError, match="std"):
        TensorSummary.from_dict(data)
    data = summarize({"x": torch.randn(5)})["x"].to_dict()
    data["nan_count"] = 1.5
    with pytest.raises(ValueError, match="expected an int"):
        TensorSummary.from_dict(data)


class _HostReads(TorchFunctionMode):
    """Records, in order, every torch call that copies to the host or reads a value there."""

    READS = frozenset({
        "cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
        "nonzero", "masked_select", "bincount", "histc", "unique", "to",
    })

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.before_first_cpu: list[str] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name == "to":  # a move to another device is a transfer; a dtype change is not
            moves = [a for a in (*args[1:], *(kwargs or {}).values()) if isinstance(a, (str, torch.device))]
            name = "to(device)" if moves else ""
        if name == "bincount" and args[0].device.type == "cpu":
            name = ""  # bincount sizes its output from the data: a sync on accelerators, not here
        if name in self.READS or name == "to(device)" or (name == "__getitem__" and _bool_index(args)):
            self.events.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple[Any, ...]) -> bool:
    index = args[1] if len(args) > 1 else None
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


def test_the_accelerator_code_reads_all_results_back_in_one_transfer() -> None:
    tensors = [t.detach() for t in _cases().values() if t.numel()]
    with _HostReads() as reads:
        _device.summarize_on_device(tensors, bins=16)
    assert reads.events.count("cpu") == 1, reads.events
    first = reads.events.index("cpu")
    # nothing is read on the host before the transfer, and after it only the packed buffer is
    assert reads.events[:first] == [], reads.events
    assert set(reads.events[first + 1:]) <= {"tolist"}, reads.events
    assert "item" not in reads.events


@pytest.mark.cuda
def test_cuda_summaries_equal_cpu_ones_and_never_sync_before_the_transfer() -> None:
    tensors = {name: t for name, t in _cases().items() if t.dtype != torch.float64}
    on_gpu = {name: t.detach().cuda() for name, t in tensors.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            _device.pack(list(on_gpu.values()), 64, torch.float64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gpu = summarize(on_gpu)
    cpu = summarize(tensors)
    for name in tensors:
        assert gpu[name].histogram.counts == cpu[name].histogram.counts, name
        assert gpu[name].histogram.edges == cpu[name].histogram.edges, name
        assert gpu[name].min == cpu[name].min
        assert gpu[name].mean == pytest.approx(cpu[name].mean, rel=1e-5, abs=1e-6)


# -- Summaries: one tensor at a time ------------------------------------------------------------


def test_tensors_summarised_as_they_come_match_numpy_whatever_happens_to_them_later() -> None:
    g = torch.Generator().manual_seed(5)
    noisy = torch.randn(4000, generator=g)
    noisy[[5, 77]] = torch.tensor([NAN, -INF])
    tensors = {
        "normal": torch.randn(5000, generator=g), "relu": torch.randn(64, 80, generator=g).relu(),
        "small": torch.randn(7, generator=g), "constant": torch.full((3000,), 2.5), "nan_inf": noisy,
        "float64": torch.randn(3000, dtype=torch.float64, generator=g) * 1e3,
        "int": torch.randint(-9, 9, (2500,), generator=g),
        "huge": torch.linspace(1e37, 3e38, 2049, dtype=torch.float64).float(),  # squares overflow
        "transposed": torch.randn(50, 60, generator=g).t(),
    }
    originals = {name: tensor.clone() for name, tensor in tensors.items()}
    summaries = summaries_module.Summaries(bins=16)
    for name, tensor in tensors.items():
        summaries.add(name, tensor)
        if summaries.streams(tensor):
            tensor.zero_()  # summarised already: the caller may reuse the memory
    found = summaries.result()
    assert list(found) == list(tensors)
    for name, original in originals.items():
        _check_against_numpy(original, found[name], 16)


def test_what_summaries_summarise_at_once() -> None:
    streams = summaries_module.Summaries.streams
    assert streams(torch.randn(2049))
    assert streams(torch.randn(50, 50).t())
    assert not streams(torch.randn(2048))  # small: cheaper with the others, at the end
    assert not streams(torch.randn(5000, device="meta"))  # not on the CPU: one transfer, at the end
    assert not streams(torch.eye(3000).to_sparse())  # the general code (or its error), at the end
    assert not streams(torch.quantize_per_tensor(torch.randn(3000), 0.1, 0, torch.qint8))


def test_summaries_take_each_key_once_and_forget_what_is_discarded_or_cleared() -> None:
    summaries = summaries_module.Summaries(bins=8)
    summaries.add("big", torch.randn(3000))
    summaries.add("small", torch.randn(3))
    with pytest.raises(ValueError, match="'big' was added before; each key takes one tensor"):
        summaries.add("big", torch.randn(3))
    summaries.discard("big")
    summaries.discard("never added")
    assert "big" not in summaries
    assert "small" in summaries
    assert list(summaries.result()) == ["small"]
    summaries.clear()
    assert summaries.result() == {}
    with pytest.raises(TypeError, match="complex"):
        summaries.add("z", torch.ones(3000, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"tensors\['x'\] is a list"):
        summaries.add("x", [1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bins=0"):
        summaries_module.Summaries(bins=0)


def test_the_summaries_own_ops_are_invisible_to_an_active_torch_function_mode() -> None:
    class Watch(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[Any] = []

        def __torch_function__(
            self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    big, small = torch.randn(5000), torch.randn(5)
    summaries = summaries_module.Summaries()
    with Watch() as watch:  # a capture's mode, when a module's output is summarised in its hook
        summaries.add("big", big)
        summaries.add("small", small)
        summaries.result()
    assert watch.seen == []


def test_a_view_added_later_shares_the_summary_only_while_the_values_are_the_same() -> None:
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(4))
    summaries = summaries_module.Summaries()
    summaries.add("x", x)
    summaries.add("reshaped", x.reshape(50, 64))  # the same elements, unchanged: shared
    summaries.add("transposed", x.t())
    summaries.add("rows", x[:10])  # fewer elements: its own
    x.mul_(2)  # a write: the view added next has new values
    summaries.add("after the write", x.view(-1))
    found = summaries.result()
    assert found["x"] == found["reshaped"] == found["transposed"]
    assert found["rows"].numel == 500
    assert found["after the write"].max == 2 * found["x"].max
    assert found["after the write"].std == pytest.approx(2 * found["x"].std, rel=1e-6)
