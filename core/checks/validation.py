"""``validate_model_activations``: proves the saved activations by replaying every op.

Each op is re-run on the saved outputs of its parents (plus its recorded non-tensor arguments)
and must reproduce its own saved output; then it is re-run on shifted parents and must *not*
reproduce it, which catches a saved value that the op did not really use. Random ops replay
exactly because ops are replayed in execution order from the RNG state the capture started with.
The model itself is never touched: the passes run on copies.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lens_core._rng import get_rng_states, set_rng_states
from lens_core.capture.history import ModelHistory
from lens_core.capture.recorder import iter_tensors
from lens_core.capture.records import CallRecord, Layer, ParentRef
from lens_core.capture.session import Capture, as_args, run_forward

__all__ = ["LayerCheck", "ValidationReport", "validate_model_activations", "validation_report"]

Status = Literal["ok", "close", "skipped", "failed"]

# Ops that return uninitialised memory: their contents cannot be compared.
_UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty"})
# Ops whose output depends on the shapes and dtypes of their inputs, not on their values
# (factories "like" a tensor, and in-place fills such as stochastic depth's bernoulli_).
_VALUE_INDEPENDENT = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zero_", "fill_",
    "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_",
})
# Relative and absolute tolerance when an exact replay differs (other kernels, other layouts).
_TOLERANCE = {
    torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2),
    torch.float32: (1e-4, 1e-6), torch.float64: (1e-7, 1e-10),
}


@dataclass(frozen=True)
class LayerCheck:
    """How one layer fared: ``ok`` (bitwise), ``close`` (within dtype tolerance), ``skipped``
    (with the reason) or ``failed`` (with what went wrong)."""

    label: str
    status: Status
    reason: str = ""


@dataclass
class ValidationReport:
    """The outcome of :func:`validation_report`; true when every check passed."""

    model_name: str
    checks: list[LayerCheck] = field(default_factory=list)
    output_problem: str = ""
    """Why the captured pass's output differs from a plain run's ('' when it does not)."""

    @property
    def failures(self) -> list[LayerCheck]:
        return [check for check in self.checks if check.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.output_problem and not self.failures

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("ok", "close", "skipped", "failed")}
        lines = [
            f"Validation of {self.model_name}: {'passed' if self.ok else 'FAILED'} "
            f"({', '.join(f'{n} {s}' for s, n in counts.items())})"
        ]
        if self.output_problem:
            lines.append(f"  model output: {self.output_problem}")
        lines += [f"  {c.label}: {c.status}: {c.reason}" for c in self.checks
                  if c.status in ("failed", "skipped")]
        return "\n".join(lines)


def _compare(replayed: Any, saved: torch.Tensor) -> tuple[Status, str]:
    if not isinstance(replayed, torch.Tensor):
        return "failed", f"replay returned {type(replayed).__name__}, not a tensor"
    if replayed.shape != saved.shape or replayed.dtype != saved.dtype:
        return "failed", (f"replay gave {tuple(replayed.shape)} {replayed.dtype}, "
                          f"saved {tuple(saved.shape)} {saved.dtype}")
    replayed, saved = replayed.detach(), saved.detach()
    if torch.equal(replayed, saved):
        return "ok", ""
    if saved.is_floating_point() and torch.equal(replayed.isnan(), saved.isnan()) and torch.equal(
        replayed.nan_to_num(), saved.nan_to_num()
    ):
        return "ok", "equal, NaNs included"
    rtol, atol = _TOLERANCE.get(saved.dtype, (0.0, 0.0))
    if saved.is_floating_point() and torch.allclose(replayed, saved, rtol=rtol, atol=atol, equal_nan=True):
        return "close", "replay within tolerance"
    diff = (replayed.double() - saved.double()).abs().max().item() if saved.is_floating_point() else "n/a"
    return "failed", f"replay differs from the saved output (max abs difference {diff})"


def _shift(tensor: torch.Tensor, sign: float, generator: torch.Generator) -> torch.Tensor:
    """A different value at every element, moved all one way (so saturating ops move too)."""
    noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device, tensor.dtype)
    scale = tensor.detach().abs().amax() + 1 if tensor.numel() else 1
    return tensor.detach() + sign * scale * (1 + noise)


class _Replayer:
    """Re-runs the recorded ops of a history, optionally with some parents replaced."""

    def __init__(self, history: ModelHistory) -> None:
        self.history = history
        self.generator = torch.Generator().manual_seed(0)

    def run(self, layer: Layer, call: CallRecord, shift: tuple[int, float] | None = None) -> Any:
        """Replays ``layer``'s op; ``shift`` = (parent index, direction) moves that parent."""

        def resolve(value: Any) -> Any:
            if isinstance(value, ParentRef):
                saved = self.history[value.index].tensor_contents
                assert saved is not None  # validation saves every layer
                if shift is not None and value.index == shift[0]:
                    return _shift(saved, shift[1], self.generator)
                return saved.detach().clone() if layer.is_inplace else saved.detach()
            if type(value) in (list, tuple):
                return type(value)(resolve(v) for v in value)
            return value

        args = tuple(resolve(a) for a in call.args)
        kwargs = {k: resolve(v) for k, v in call.kwargs.items()}
        assert layer.func is not None
        with torch.no_grad():
            result = layer.func(*args, **kwargs)
        if result is None and args:  # item assignment: the result is the written-to tensor
            result = args[0]
        return result if layer.output_index is None else result[layer.output_index]


def _parent_refs(call: CallRecord) -> list[int]:
    nested = (x for a in call.args if type(a) in (list, tuple) for x in a)
    values = (*call.args, *call.kwargs.values(), *nested)
    return list(dict.fromkeys(v.index for v in values if isinstance(v, ParentRef)))


def _dependence(
    replayer: _Replayer, layer: Layer, call: CallRecord, saved: torch.Tensor
) -> LayerCheck | None:
    """None if moving a parent changes the output (or the test does not apply), else the verdict."""
    parents = _parent_refs(call)
    float_parents = [i for i in parents if replayer.history[i].dtype.is_floating_point]
    testable = saved.is_floating_point() and saved.numel() > 0
    if not float_parents or not testable or layer.func_name in _VALUE_INDEPENDENT:
        return None
    # One parent at a time, and only until one makes a difference: moving an index-like
    # argument (roi_align's boxes) can take a native op out of bounds.
    rng = get_rng_states()
    try:
        for parent in float_parents:
            for sign in (1.0, -1.0):
                set_rng_states(rng)
                try:
                    replayed = replayer.run(layer, call, shift=(parent, sign))
                except Exception:  # moved out of the op's domain: the value is used
                    return None
                if _compare(replayed, saved)[0] == "failed":
                    return None
    finally:
        set_rng_states(rng)
    if len(float_parents) < len(parents):  # e.g. x_int.to(y_float): the values are x's
        return None
    if bool((saved == saved.flatten()[0]).all()):
        return LayerCheck(layer.label, "skipped", "constant output (e.g. clamp(min=5, max=5)): "
                          "its dependence on the parents cannot be tested")
    return LayerCheck(layer.label, "failed", "output does not change when its parents change: "
                      "the saved parent values may not be the ones the op used")


def _check_layer(replayer: _Replayer, layer: Layer, call: CallRecord) -> LayerCheck:
    saved = layer.tensor_contents
    if saved is None:
        return LayerCheck(layer.label, "failed", "output was not saved")
    if "generator" in call.kwargs:
        return LayerCheck(layer.label, "skipped", "random op with its own generator: not replayable")
    if layer.func_name in _UNINITIALISED:
        return LayerCheck(layer.label, "skipped", "uninitialised memory: its contents are arbitrary")
    try:
        status, reason = _compare(replayer.run(layer, call), saved)
    except Exception as error:  # a replay that cannot run is a failed check, not a crash
        return LayerCheck(layer.label, "failed", f"replay raised {type(error).__name__}: {error}")
    if status == "failed":
        return LayerCheck(layer.label, status, reason)
    return _dependence(replayer, layer, call, saved) or LayerCheck(layer.label, status, reason)


def validation_report(
    model: nn.Module,
    input_args: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    random_seed: int | None = None,
) -> ValidationReport:
    """Captures a pass with everything saved and checks every layer; see the module docstring."""
    user_rng = get_rng_states()
    try:
        captured_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
        cap = Capture(captured_model, "all", random_seed=random_seed, save_function_args=True)
        history, output = run_forward(cap, input_args, input_kwargs)
        report = ValidationReport(history.model_name)
        if random_seed is None:
            start = history.rng_states
        else:
            torch.manual_seed(random_seed)
            start = get_rng_states()
        set_rng_states(start)
        plain = plain_model(*as_args(input_args), **dict(input_kwargs or {}))
        captured_tensors, plain_tensors = list(iter_tensors(output)), list(iter_tensors(plain))
        if len(captured_tensors) != len(plain_tensors) or not all(
            torch.equal(a, b) for a, b in zip(captured_tensors, plain_tensors, strict=True)
        ):
            report.output_problem = "the captured pass's output differs from a plain run's"

        set_rng_states(start)
        replayer = _Replayer(history)
        replayed_calls: set[int] = set()
        for layer in history:
            if layer.is_input:
                continue
            if layer.is_output:
                source, saved = history[layer.parents[0]].tensor_contents, layer.tensor_contents
                same = source is not None and saved is not None and torch.equal(source, saved)
                why = "" if same else "output differs from its parent"
                report.checks.append(LayerCheck(layer.label, "ok" if same else "failed", why))
                continue
            call = layer.call
            if call is None or layer.func is None:
                report.checks.append(LayerCheck(layer.label, "failed", "no recorded call to replay"))
                continue
            if id(call) in replayed_calls:  # later outputs of a multi-output op: RNG already used
                rng = get_rng_states()
            else:
                rng = None
                replayed_calls.add(id(call))
            report.checks.append(_check_layer(replayer, layer, call))
            if rng is not None:
                set_rng_states(rng)
        return report
    finally:
        set_rng_states(user_rng)


def validate_model_activations(
    model: nn.Module,
    input_args: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    random_seed: int | None = None,
    verbose: bool = False,
) -> bool:
    """True when every saved activation of a pass is proven right (TorchLens API).

    On failure a ``RuntimeWarning`` says which layers failed and why, so ``False`` is never
    silent; ``verbose=True`` prints the report either way. :func:`validation_report` returns
    the report itself.
    """
    report = validation_report(model, input_args, input_kwargs, random_seed)
    if verbose:
        print(report)  # the caller asked for it
    if not report.ok:
        warnings.warn(str(report), RuntimeWarning, stacklevel=2)
    return report.ok
