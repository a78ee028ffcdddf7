"""The rules: each reads the summaries of captured steps and names what went wrong, where and since when.

Every rule is a small frozen dataclass: its fields are its thresholds (validated at
construction), its class attributes the name, the one-line reason and the source the README's
rules table shows. ``check`` takes captured steps in step order and returns findings. The rules
read only what every capture already records (statistics and histograms, the layers' types and
dtypes), so they run on a live run and on a run folder alike.

Thresholds are set so that healthy runs stay silent: a finding a user learns to ignore teaches
them to turn findings off. Estimates from histograms count the part of a bin that overlaps the
range asked about, as if its values were spread evenly.
"""

from __future__ import annotations

import abc
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lens_callbacks.findings.finding import Finding, Severity, ranked
from lens_callbacks.findings.snapshot import LayerFacts, StepSummaries
from lens_core.summaries import TensorSummary

__all__ = [
    "DEFAULT_RULES",
    "AttentionEntropyCollapse",
    "DeadUnits",
    "ExplodingGradients",
    "Fp16Underflow",
    "NonFinite",
    "NumericHeadroom",
    "Rule",
    "Saturation",
    "SuddenChange",
    "UpdateRatio",
    "VanishingGradients",
    "find",
]

# Layer types whose output is exactly zero where a unit is off.
RELU_LIKE = frozenset({"relu", "relu_", "relu6", "threshold", "threshold_"})
# Bounded activations and their bounds.
BOUNDED = {"sigmoid": (0.0, 1.0), "sigmoid_": (0.0, 1.0), "tanh": (-1.0, 1.0), "tanh_": (-1.0, 1.0),
           "hardsigmoid": (0.0, 1.0), "hardtanh": (-1.0, 1.0)}
# Ops that weigh values by attention probabilities (possibly after a dropout).
_WEIGHING = frozenset({"matmul", "bmm", "baddbmm", "einsum", "__matmul__"})
_DROPOUT = frozenset({"dropout", "dropout_", "__getitem__", "to", "type_as", "contiguous"})
FP16_SMALLEST_NORMAL = float(torch.finfo(torch.float16).tiny)  # 6.1e-5
# Score of a finding with no threshold to be past (non-finite values): above any other.
_TOP_SCORE = 100.0


class Rule(abc.ABC):
    """A check over captured steps (see the module docstring)."""

    name: ClassVar[str]
    severity: ClassVar[Severity]
    reason: ClassVar[str]
    """Why the condition matters, in one line."""
    source: ClassVar[str]
    """Where the threshold and the reasoning come from (paper, well-known practice)."""

    @property
    @abc.abstractmethod
    def threshold(self) -> str:
        """The threshold in words, from this rule's settings."""

    @abc.abstractmethod
    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        """The findings over ``steps`` (captured steps in step order)."""


# -- helpers ------------------------------------------------------------------------------------


def _rms(summary: TensorSummary) -> float:
    """Root mean square of the finite values: a gradient's size per value, whatever the layer's size."""
    count = summary.finite_count
    return summary.l2_norm / math.sqrt(count) if count else math.nan


def _fraction_in(summary: TensorSummary, low: float, high: float) -> float:
    """Estimated fraction of the finite values in ``[low, high]`` (the histogram's overlap)."""
    edges, counts = summary.histogram.edges, summary.histogram.counts
    total = sum(counts)
    if not total:
        return 0.0
    inside = 0.0
    for left, right, count in zip(edges, edges[1:], counts, strict=False):
        if not count:
            continue
        if right <= left:  # a zero-width bin (all values equal): inside or not
            inside += count if low <= left <= high else 0
            continue
        overlap = min(right, high) - max(left, low)
        if overlap > 0:
            inside += count * min(1.0, overlap / (right - left))
    return inside / total


def _orders(ratio: float) -> float:
    """``ratio`` in orders of magnitude (0 for 1, 2 for 100 and for 0.01)."""
    return abs(math.log10(ratio)) if ratio > 0 and math.isfinite(ratio) else _TOP_SCORE


def _ordered(names: Iterable[str], steps: Sequence[StepSummaries]) -> tuple[str, ...]:
    """Names in execution order (the latest step's); parameter names after, as they came."""
    index: dict[str, int] = {}
    for snapshot in steps:
        index.update((label, facts.index) for label, facts in snapshot.layers.items())
    unique = list(dict.fromkeys(names))
    return tuple(sorted(unique, key=lambda name: (name not in index, index.get(name, 0), unique.index(name))))


def _steps_text(steps: Sequence[int]) -> str:
    shown = ", ".join(map(str, steps[:6]))
    if len(steps) == 1:
        return f"step {shown}"
    return f"steps {shown}" + (f" ... {steps[-1]}" if len(steps) > 6 else "")


@dataclass
class _Hits:
    """Where one subject met a rule's condition: steps, and the worst value seen."""

    steps: list[int]
    worst: float
    worst_step: int
    layers: list[str]


def _per_subject(
    steps: Sequence[StepSummaries],
    measure: Callable[[StepSummaries], Iterator[tuple[str, float, Sequence[str]]]],
    worse: Callable[[float, float], bool],
) -> dict[str, _Hits]:
    """Runs ``measure`` over every step; it yields ``(subject, value, layers)`` where its condition holds."""
    hits: dict[str, _Hits] = {}
    for snapshot in steps:
        for subject, value, layers in measure(snapshot):
            hit = hits.get(subject)
            if hit is None:
                hits[subject] = _Hits([snapshot.step], value, snapshot.step, list(layers))
                continue
            hit.steps.append(snapshot.step)
            hit.layers += [layer for layer in layers if layer not in hit.layers]
            if worse(value, hit.worst):
                hit.worst, hit.worst_step = value, snapshot.step
    return hits


def _where(facts: LayerFacts | None) -> str:
    return f" (in {facts.module})" if facts is not None and facts.module else ""


def _weighted(snapshot: StepSummaries) -> list[tuple[str, float]]:
    """(label, gradient RMS) of the ops with parameters, in execution order, where non-zero."""
    found = []
    for label, facts in snapshot.layers.items():
        summary = snapshot.gradients.get(label)
        if facts.has_params and summary is not None and summary.finite_count:
            rms = _rms(summary)
            if rms > 0:
                found.append((label, rms))
    return found


def _check_positive(name: str, value: float, upper: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or (upper is not None and not value < upper):
        limit = "" if upper is None else f" and < {upper:g}"
        raise ValueError(f"{name}={value!r}: use a number > 0{limit}.")


# -- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonFinite(Rule):
    """NaN or infinite values in an activation, a gradient or a parameter's gradient."""

    name: ClassVar[str] = "non_finite"
    severity: ClassVar[Severity] = Severity.ERROR
    reason: ClassVar[str] = "one NaN or Inf spreads to every weight the optimizer touches next"
    source: ClassVar[str] = ("torch.autograd.detect_anomaly; mixed-precision training (Micikevicius et al., "
                             "2018)")

    @property
    def threshold(self) -> str:
        return "any NaN or Inf value"

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        hit_steps: list[int] = []
        names: list[str] = []
        first: str | None = None
        for snapshot in steps:
            found = self._non_finite(snapshot)
            if found:
                hit_steps.append(snapshot.step)
                first = first or found[0]
                names += [name for name in found if name not in names]
        if not hit_steps or first is None:
            return []
        message = (f"{first} first holds NaN or Inf at step {hit_steps[0]}; {len(names)} tensor(s) hold them "
                   f"by step {hit_steps[-1]}")
        layers = tuple(name.partition(" of ")[2] for name in names)
        return [Finding(self.name, self.severity, message, tuple(dict.fromkeys(layers)), tuple(hit_steps),
                        "model", _TOP_SCORE)]

    @staticmethod
    def _non_finite(snapshot: StepSummaries) -> list[str]:
        """The non-finite tensors of a step, the one that went first first: activations in
        execution order, then gradients in backward order, then parameters' gradients."""
        def bad(summaries: Mapping[str, TensorSummary]) -> list[str]:
            return [name for name, s in summaries.items() if s.nan_count or s.inf_count]

        order = {label: facts.index for label, facts in snapshot.layers.items()}
        activations = sorted(bad(snapshot.activations), key=lambda label: order.get(label, 0))
        gradients = sorted(bad(snapshot.gradients), key=lambda label: -order.get(label, 0))
        return ([f"the activation of {label}" for label in activations]
                + [f"the gradient of {label}" for label in gradients]
                + [f"the gradient of {name}" for name in bad(snapshot.parameter_gradients)])


@dataclass(frozen=True)
class VanishingGradients(Rule):
    """The gradient reaching the first layer with parameters is far smaller than at the last one."""

    ratio: float = 1e-3
    name: ClassVar[str] = "vanishing_gradients"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = "early layers barely learn when the gradient shrinks through depth"
    source: ClassVar[str] = ("Glorot & Bengio, Understanding the difficulty of training deep feedforward "
                             "neural networks (2010); Hochreiter (1991)")

    def __post_init__(self) -> None:
        _check_positive("ratio", self.ratio, 1.0)

    @property
    def threshold(self) -> str:
        return (f"gradient RMS at the first op with parameters < {self.ratio:g} x the last one's "
                "(ops whose gradient is exactly zero are left to dead_units)")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        measured = [(s, w) for s in steps if len(w := _weighted(s)) >= 2]
        if not measured:
            return []

        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            weighted = _weighted(snapshot)
            if len(weighted) < 2:
                return
            last = weighted[-1][1]
            ratio = weighted[0][1] / last
            if ratio < self.ratio:
                yield "model", ratio, [label for label, rms in weighted[:-1] if rms < self.ratio * last]

        hit = _per_subject(steps, measure, lambda a, b: a < b).get("model")
        if hit is None:
            return []
        first_snapshot, first_weighted = measured[0]
        last_snapshot, last_weighted = measured[-1]
        trend = ""
        if len(measured) > 1:
            before = first_weighted[0][1] / first_weighted[-1][1]
            after = last_weighted[0][1] / last_weighted[-1][1]
            trend = (f"; the ratio went from {before:.1e} at step {first_snapshot.step} to {after:.1e} at "
                     f"step {last_snapshot.step}")
        message = (f"the gradient reaching {first_weighted[0][0]} is {hit.worst:.1e} x the one at "
                   f"{last_weighted[-1][0]} (step {hit.worst_step}; threshold {self.ratio:g}), "
                   f"{len(hit.layers)} layer(s) below it{trend}")
        return [Finding(self.name, self.severity, message, _ordered(hit.layers, steps), tuple(hit.steps),
                        "model", _orders(hit.worst / self.ratio))]


@dataclass(frozen=True)
class ExplodingGradients(Rule):
    """Gradients growing through depth, or the total gradient norm growing across steps."""

    growth: float = 100.0
    depth_ratio: float = 1e3
    name: ClassVar[str] = "exploding_gradients"
    severity: ClassVar[Severity] = Severity.ERROR
    reason: ClassVar[str] = "steps of growing size throw the weights far from where the loss was measured"
    source: ClassVar[str] = ("Pascanu, Mikolov & Bengio, On the difficulty of training recurrent neural "
                             "networks (2013): gradient norm clipping")

    def __post_init__(self) -> None:
        _check_positive("growth", self.growth)
        _check_positive("depth_ratio", self.depth_ratio)

    @property
    def threshold(self) -> str:
        return (f"total parameter-gradient norm > {self.growth:g} x its median over the first 3 captures, "
                f"or gradient RMS at the first op with parameters > {self.depth_ratio:g} x the last one's")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        norms = [(s, _total_norm(s)) for s in steps if s.parameter_gradients]
        baseline = statistics.median(norm for _, norm in norms[:3]) if norms else math.nan
        growing: dict[int, float] = {}
        if baseline > 0:
            growing = {s.step: norm / baseline for s, norm in norms[3:] if norm / baseline > self.growth}

        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            if snapshot.step in growing:
                grown = [name for name, s in snapshot.parameter_gradients.items()
                         if (first := _first_norm(norms, name)) > 0 and s.l2_norm > self.growth * first]
                yield "model", growing[snapshot.step], grown
            weighted = _weighted(snapshot)
            if len(weighted) >= 2 and weighted[0][1] / weighted[-1][1] > self.depth_ratio:
                last = weighted[-1][1]
                deep = [label for label, rms in weighted if rms > self.depth_ratio * last]
                yield "depth", weighted[0][1] / last, deep

        findings = []
        for subject, hit in _per_subject(steps, measure, lambda a, b: a > b).items():
            if subject == "model":
                message = (f"the total gradient norm grew to {hit.worst:.3g} x its early median "
                           f"{baseline:.3g} (step {hit.worst_step}; threshold {self.growth:g} x)")
                score = _orders(hit.worst / self.growth)
            else:
                message = (f"the gradient at the first op with parameters is {hit.worst:.3g} x the one at "
                           f"the last (step {hit.worst_step}; threshold {self.depth_ratio:g} x)")
                score = _orders(hit.worst / self.depth_ratio)
            findings.append(Finding(self.name, self.severity, message, _ordered(hit.layers, steps),
                                    tuple(hit.steps), subject, score))
        return findings


def _total_norm(snapshot: StepSummaries) -> float:
    return math.sqrt(sum(s.l2_norm**2 for s in snapshot.parameter_gradients.values()))


def _first_norm(norms: Sequence[tuple[StepSummaries, float]], name: str) -> float:
    for snapshot, _ in norms[:3]:
        if name in snapshot.parameter_gradients:
            return snapshot.parameter_gradients[name].l2_norm
    return 0.0


@dataclass(frozen=True)
class DeadUnits(Rule):
    """A ReLU-like op whose output is (nearly) all exact zeros."""

    zero_fraction: float = 0.95
    name: ClassVar[str] = "dead_units"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = "a ReLU unit that outputs zero passes no gradient and never recovers"
    source: ClassVar[str] = ("Maas, Hannun & Ng, Rectifier Nonlinearities Improve Neural Network Acoustic "
                             "Models (2013); Lu et al., Dying ReLU and Initialization (2019)")

    def __post_init__(self) -> None:
        _check_positive("zero_fraction", self.zero_fraction, 1.0 + 1e-12)

    @property
    def threshold(self) -> str:
        return f"zero fraction of a ReLU-like output >= {self.zero_fraction:.0%}"

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            for label, facts in snapshot.layers.items():
                summary = snapshot.activations.get(label)
                if facts.layer_type in RELU_LIKE and summary is not None and summary.numel > 1 \
                        and summary.zero_fraction >= self.zero_fraction:
                    yield label, summary.zero_fraction, [label]

        labels = {label for s in steps for label in s.activations}
        captured = {label: sum(label in s.activations for s in steps) for label in labels}
        findings = []
        for label, hit in _per_subject(steps, measure, lambda a, b: a > b).items():
            facts = steps[-1].layers.get(label)
            always = len(hit.steps) == captured[label] and hit.worst == 1.0 and len(hit.steps) > 1
            note = "; all zero at every captured step: the layer is dead" if always else ""
            message = (f"{hit.worst:.1%} of the output of {label}{_where(facts)} is exactly zero (step "
                       f"{hit.worst_step}; threshold {self.zero_fraction:.0%}){note}")
            score = _orders(max(1.0 - hit.worst, 1e-6) / max(1.0 - self.zero_fraction, 1e-12))
            findings.append(Finding(self.name, self.severity, message, (label,), tuple(hit.steps), label,
                                    score))
        return findings


def is_attention(facts: LayerFacts, layers: Mapping[str, LayerFacts]) -> bool:
    """Whether a softmax's output weighs values: a matmul consumes it (perhaps after a dropout)."""
    if facts.layer_type != "softmax" or len(facts.shape) < 3:
        return False
    consumers = [layers[child] for child in facts.children if child in layers]
    for consumer in consumers:
        if consumer.layer_type in _WEIGHING:
            return True
        if consumer.layer_type in _DROPOUT and any(
                layers[child].layer_type in _WEIGHING for child in consumer.children if child in layers):
            return True
    return False


@dataclass(frozen=True)
class Saturation(Rule):
    """Bounded activations stuck near their bounds; attention softmax rows close to one-hot."""

    fraction: float = 0.5
    margin: float = 0.02
    one_hot_rows: float = 0.9
    name: ClassVar[str] = "saturation"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = "a saturated unit has a near-zero derivative, so its inputs stop learning"
    source: ClassVar[str] = ("LeCun et al., Efficient BackProp (1998); Glorot & Bengio (2010); Vaswani et "
                             "al., Attention Is All You Need (2017): the 1/sqrt(d) scaling of attention "
                             "logits")

    def __post_init__(self) -> None:
        _check_positive("fraction", self.fraction, 1.0 + 1e-12)
        _check_positive("margin", self.margin, 0.5)
        _check_positive("one_hot_rows", self.one_hot_rows, 1.0 + 1e-12)

    @property
    def threshold(self) -> str:
        return (f"sigmoid/tanh: >= {self.fraction:.0%} of values within {self.margin:.0%} of the range from "
                f"a bound; attention softmax: >= {self.one_hot_rows:.0%} of rows with a probability > "
                f"{1 - self.margin:g} (estimated from the histogram)")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            for label, facts in snapshot.layers.items():
                summary = snapshot.activations.get(label)
                if summary is None or summary.numel <= 1:
                    continue
                value = self._saturated(facts, summary, snapshot.layers)
                if value is not None and value >= (self.one_hot_rows if facts.layer_type == "softmax"
                                                   else self.fraction):
                    yield label, value, [label]

        findings = []
        for label, hit in _per_subject(steps, measure, lambda a, b: a > b).items():
            facts = steps[-1].layers.get(label)
            if facts is not None and facts.layer_type == "softmax":
                what = (f"{hit.worst:.0%} of the attention rows of {label}{_where(facts)} are near one-hot "
                        f"(a probability > {1 - self.margin:g}; threshold {self.one_hot_rows:.0%})")
                limit = self.one_hot_rows
            else:
                kind = facts.layer_type if facts is not None else "bounded op"
                what = (f"{hit.worst:.0%} of the output of {kind} {label}{_where(facts)} is within "
                        f"{self.margin:.0%} of its bounds (threshold {self.fraction:.0%})")
                limit = self.fraction
            message = f"{what}, step {hit.worst_step}"
            score = _orders(max(1.0 - hit.worst, 1e-6) / max(1.0 - limit, 1e-12))
            findings.append(Finding(self.name, self.severity, message, (label,), tuple(hit.steps), label,
                                    score))
        return findings

    def _saturated(
        self, facts: LayerFacts, summary: TensorSummary, layers: Mapping[str, LayerFacts]
    ) -> float | None:
        if facts.layer_type in BOUNDED:
            low, high = BOUNDED[facts.layer_type]
            width = self.margin * (high - low)
            return _fraction_in(summary, low, low + width) + _fraction_in(summary, high - width, high)
        if is_attention(facts, layers):
            rows = summary.numel / facts.shape[-1]
            # at most one probability per row exceeds 1/2: values above the cut count rows
            return _fraction_in(summary, 1 - self.margin, 1.0) * summary.finite_count / rows
        return None


def collision_entropy(summary: TensorSummary, row_length: int) -> float:
    """Mean collision (Renyi-2) entropy of probability rows, ``-log(mean sum p^2)``, in nats.

    Exact from ``l2_norm`` (``l2_norm**2 / rows`` is the mean of ``sum p^2``); a lower bound of
    the Shannon entropy that is 0 for one-hot rows and ``log K`` for uniform ones, as Shannon's.
    """
    rows = summary.numel / row_length
    mean_square = summary.l2_norm**2 / rows
    return -math.log(mean_square) if mean_square > 0 else math.nan


@dataclass(frozen=True)
class AttentionEntropyCollapse(Rule):
    """The entropy of an attention softmax falling over the captured steps."""

    fall: float = 0.5
    floor: float = 0.1
    name: ClassVar[str] = "attention_entropy_collapse"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = ("attention that collapses onto one key stops mixing information and "
                             "destabilises training")
    source: ClassVar[str] = ("Zhai et al., Stabilizing Transformer Training by Preventing Attention Entropy "
                             "Collapse (ICML 2023)")

    def __post_init__(self) -> None:
        _check_positive("fall", self.fall, 1.0)
        _check_positive("floor", self.floor, 1.0)

    @property
    def threshold(self) -> str:
        return (f"collision entropy of an attention softmax < {self.floor:g} x log(keys) and < "
                f"{self.fall:g} x its value at the first capture")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        first: dict[str, tuple[int, float]] = {}

        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            for label, facts in snapshot.layers.items():
                summary = snapshot.activations.get(label)
                if summary is None or not is_attention(facts, snapshot.layers) or facts.shape[-1] < 2:
                    continue
                normalised = collision_entropy(summary, facts.shape[-1]) / math.log(facts.shape[-1])
                if not math.isfinite(normalised):
                    continue
                start = first.setdefault(label, (snapshot.step, normalised))[1]
                if normalised < self.floor and normalised < self.fall * start:
                    yield label, normalised, [label]

        findings = []
        for label, hit in _per_subject(steps, measure, lambda a, b: a < b).items():
            facts = steps[-1].layers.get(label)
            start_step, start = first[label]
            message = (f"the attention entropy of {label}{_where(facts)} fell from {start:.2f} x log(keys) "
                       f"at step {start_step} to {hit.worst:.2f} x at step {hit.worst_step} (threshold: "
                       f"below {self.floor:g} x and below {self.fall:g} x the first)")
            findings.append(Finding(self.name, self.severity, message, (label,), tuple(hit.steps), label,
                                    _orders(max(hit.worst, 1e-6) / self.floor)))
        return findings


@dataclass(frozen=True)
class NumericHeadroom(Rule):
    """Half-precision values approaching the largest number their dtype holds."""

    fraction: float = 0.1
    name: ClassVar[str] = "numeric_headroom"
    severity: ClassVar[Severity] = Severity.ERROR
    reason: ClassVar[str] = "a value past the dtype's maximum becomes Inf, then NaN everywhere downstream"
    source: ClassVar[str] = ("Micikevicius et al., Mixed Precision Training (ICLR 2018); Kalamkar et al., "
                             "A Study of BFLOAT16 for Deep Learning Training (2019)")

    def __post_init__(self) -> None:
        _check_positive("fraction", self.fraction, 1.0 + 1e-12)

    @property
    def threshold(self) -> str:
        return (f"largest magnitude of a float16/bfloat16 activation or gradient >= {self.fraction:.0%} of "
                "the dtype's maximum")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            for label, facts in snapshot.layers.items():
                if facts.dtype not in (torch.float16, torch.bfloat16):
                    continue
                largest = float(torch.finfo(facts.dtype).max)
                kinds = (("activation", snapshot.activations), ("gradient", snapshot.gradients))
                for kind, summaries in kinds:
                    summary = summaries.get(label)
                    if summary is None or not summary.finite_count:
                        continue
                    share = max(abs(summary.min), abs(summary.max)) / largest
                    if share >= self.fraction:
                        yield f"{kind} of {label}", share, [label]

        findings = []
        for subject, hit in _per_subject(steps, measure, lambda a, b: a > b).items():
            label = hit.layers[0]
            facts = steps[-1].layers.get(label)
            dtype = str(facts.dtype).removeprefix("torch.") if facts is not None else "its dtype"
            message = (f"the {subject}{_where(facts)} reaches {hit.worst:.0%} of {dtype}'s maximum (step "
                       f"{hit.worst_step}; threshold {self.fraction:.0%}): overflow ahead")
            findings.append(Finding(self.name, self.severity, message, (label,), tuple(hit.steps), subject,
                                    _orders(hit.worst / self.fraction)))
        return findings


@dataclass(frozen=True)
class Fp16Underflow(Rule):
    """Gradients of float16 ops whose values fall below float16's smallest normal number."""

    fraction: float = 0.25
    name: ClassVar[str] = "fp16_underflow"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = ("gradients below 6.1e-5 lose precision or flush to zero in float16, so updates "
                             "vanish")
    source: ClassVar[str] = "Micikevicius et al., Mixed Precision Training (ICLR 2018): loss scaling"

    def __post_init__(self) -> None:
        _check_positive("fraction", self.fraction, 1.0 + 1e-12)

    @property
    def threshold(self) -> str:
        return (f">= {self.fraction:.0%} of a float16 gradient's non-zero values below "
                f"{FP16_SMALLEST_NORMAL:.2g} in magnitude (estimated from the histogram; the recorded "
                "gradients are unscaled, so with a GradScaler this is what the scale must make up for)")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            for label, facts in snapshot.layers.items():
                summary = snapshot.gradients.get(label)
                if facts.dtype != torch.float16 or summary is None or summary.numel <= 1 \
                        or not summary.finite_count:
                    continue
                tiny = _fraction_in(summary, -FP16_SMALLEST_NORMAL, FP16_SMALLEST_NORMAL)
                nonzero = 1.0 - summary.zero_fraction
                share = (tiny - summary.zero_fraction) / nonzero if nonzero > 0 else 0.0
                if share >= self.fraction:
                    yield label, share, [label]

        findings = []
        for label, hit in _per_subject(steps, measure, lambda a, b: a > b).items():
            facts = steps[-1].layers.get(label)
            message = (f"{hit.worst:.0%} of the non-zero gradient values of {label}{_where(facts)} are below "
                       f"float16's smallest normal {FP16_SMALLEST_NORMAL:.2g} (step {hit.worst_step}; "
                       f"threshold {self.fraction:.0%}): scale the loss (torch.amp.GradScaler)")
            findings.append(Finding(self.name, self.severity, message, (label,), tuple(hit.steps), label,
                                    _orders(hit.worst / self.fraction)))
        return findings


@dataclass(frozen=True)
class SuddenChange(Rule):
    """A statistic of a layer jumping by orders of magnitude between two consecutive captures."""

    factor: float = 100.0
    name: ClassVar[str] = "sudden_change"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = ("healthy training changes a layer's scale gradually; a jump marks a loss spike "
                             "or divergence")
    source: ClassVar[str] = ("what `lens diff` ranks, over a whole run; loss-spike monitoring in large-model "
                             "training (Chowdhery et al., PaLM, 2022)")

    def __post_init__(self) -> None:
        _check_positive("factor", self.factor)
        if self.factor <= 1:
            raise ValueError(f"factor={self.factor!r}: use a number > 1 (a change by that factor, up or "
                             "down).")

    @property
    def threshold(self) -> str:
        return (f"mean magnitude (mean_abs) of an activation, gradient or parameter gradient "
                f"x{self.factor:g} or /{self.factor:g} between consecutive captures (tensors of more than "
                "one value)")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        jumps: list[tuple[float, int, int, str, str]] = []  # (orders, before, after, kind, name)
        pairs: list[int] = []
        for before, after in itertools.pairwise(steps):
            if after.previous_step != before.step:
                continue
            found = list(self._jumps(before, after))
            if found:
                pairs += [before.step, after.step]
                jumps += found
        if not jumps:
            return []
        orders, before_step, after_step, kind, name = max(jumps, key=lambda jump: abs(jump[0]))
        changed = list(dict.fromkeys(jump[4] for jump in jumps))
        message = (f"the mean magnitude of the {kind} of {name} changed x{10**orders:.3g} between steps "
                   f"{before_step} and {after_step} (threshold x{self.factor:g} or /{self.factor:g}); "
                   f"{len(changed)} tensor(s) jumped so, at {len(pairs) // 2} pair(s) of consecutive "
                   "captures")
        return [Finding(self.name, self.severity, message, _ordered(changed, steps),
                        tuple(sorted(set(pairs))), "model", abs(orders) - math.log10(self.factor))]

    def _jumps(
        self, before: StepSummaries, after: StepSummaries
    ) -> Iterator[tuple[float, int, int, str, str]]:
        for kind, a, b in (("activation", before.activations, after.activations),
                           ("gradient", before.gradients, after.gradients),
                           ("parameter gradient", before.parameter_gradients, after.parameter_gradients)):
            for name, old in a.items():
                new = b.get(name)
                if new is None or old.numel <= 1 or not (old.mean_abs > 0 and new.mean_abs > 0):
                    continue
                if not (math.isfinite(old.mean_abs) and math.isfinite(new.mean_abs)):
                    continue
                ratio = new.mean_abs / old.mean_abs
                if ratio >= self.factor or ratio <= 1 / self.factor:
                    yield math.log10(ratio), before.step, after.step, kind, name


@dataclass(frozen=True)
class UpdateRatio(Rule):
    """The optimizer's step moving a weight matrix by a large fraction of its norm."""

    ratio: float = 0.25
    name: ClassVar[str] = "update_ratio"
    severity: ClassVar[Severity] = Severity.WARNING
    reason: ClassVar[str] = ("updates far above ~1e-3 of the weight's norm mean the learning rate is too "
                             "high (Adam's first steps on small weights reach ~0.05: the threshold leaves "
                             "room)")
    source: ClassVar[str] = ("Karpathy, CS231n notes, Neural Networks Part 3: ratio of weight updates to "
                             "weight magnitudes")

    def __post_init__(self) -> None:
        _check_positive("ratio", self.ratio)

    @property
    def threshold(self) -> str:
        return (f"|update| / |weight| > {self.ratio:g} for a weight matrix or kernel, over the optimizer "
                "step after the capture (measured live only)")

    def check(self, steps: Sequence[StepSummaries]) -> list[Finding]:
        def measure(snapshot: StepSummaries) -> Iterator[tuple[str, float, Sequence[str]]]:
            high = {name: value for name, value in snapshot.updates.items() if value > self.ratio}
            if high:
                yield "parameters", max(high.values()), list(high)

        hit = _per_subject(steps, measure, lambda a, b: a > b).get("parameters")
        if hit is None:
            return []
        message = (f"the optimizer moved {len(hit.layers)} parameter(s) by up to {hit.worst:.3g} of their "
                   f"norm in one step (after step {hit.worst_step}; threshold {self.ratio:g}; ~1e-3 is "
                   f"typical): {', '.join(hit.layers[:4])}{' ...' if len(hit.layers) > 4 else ''}")
        return [Finding(self.name, self.severity, message, tuple(hit.layers), tuple(hit.steps), "parameters",
                        _orders(hit.worst / self.ratio))]


DEFAULT_RULES: tuple[Rule, ...] = (
    NonFinite(), ExplodingGradients(), NumericHeadroom(), VanishingGradients(), DeadUnits(), Saturation(),
    AttentionEntropyCollapse(), Fp16Underflow(), SuddenChange(), UpdateRatio(),
)
"""Every rule, with its documented threshold."""


def find(steps: Sequence[StepSummaries], rules: Iterable[Rule] = DEFAULT_RULES) -> list[Finding]:
    """The findings of ``rules`` over captured ``steps`` (in step order), most severe first.

    Example::

        from lens_callbacks.findings import find, load_run
        for finding in find(load_run("lens_logs")):
            print(finding.line())
    """
    ordered = sorted(steps, key=lambda s: s.step)
    return ranked(finding for rule in rules for finding in rule.check(ordered))
