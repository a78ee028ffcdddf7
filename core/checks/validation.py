"""``validate_model_activations``: proves the saved activations by replaying every op.

Each op is re-run on the saved outputs of its parents (plus its recorded non-tensor arguments)
and must reproduce its own saved output; then it is re-run on shifted parents and must *not*
reproduce it, which catches a saved value that the op did not really use. Random ops replay
exactly because ops are replayed in execution order from the RNG state the capture started with
(every output of a multi-output op from the state that op started with). The plain run that the
captured pass's output is compared with starts from the same torch, Python and NumPy RNG states.

The passes run on the model itself, not on copies: ``copy.deepcopy`` fails on models that keep
autograd results as attributes (RAFT's correlation pyramid, old-style ``weight_norm``, caches
filled by an earlier pass). Instead, :class:`_ModelState` notes what a pass can change and puts
it back after each pass, so that the plain run starts where the captured one did and the caller
gets the model back as it was. What cannot be put back is named in the report, which then fails.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections import OrderedDict, defaultdict
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
    unrestored: list[str] = field(default_factory=list)
    """Model state that validation changed and could not put back, by name and why."""

    @property
    def failures(self) -> list[LayerCheck]:
        return [check for check in self.checks if check.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.output_problem and not self.failures and not self.unrestored

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
        lines += [f"  model state not put back: {name}" for name in self.unrestored]
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
    replayer: _Replayer,
    layer: Layer,
    call: CallRecord,
    saved: torch.Tensor,
    replayed: torch.Tensor,
    start: dict[str, torch.Tensor],
) -> LayerCheck | None:
    """None if moving a parent changes the output (or the test does not apply), else the verdict.

    ``replayed`` is the op's own replay, from the RNG state ``start``; each moved replay starts
    there too, so that a random op (dropout) draws the same numbers and only the moved parent
    can change its output.
    """
    parents = _parent_refs(call)
    float_parents = [i for i in parents if replayer.history[i].dtype.is_floating_point]
    testable = saved.is_floating_point() and saved.numel() > 0
    if not float_parents or not testable or layer.func_name in _VALUE_INDEPENDENT:
        return None
    # One parent at a time, and only until one makes a difference: moving an index-like
    # argument (roi_align's boxes) can take a native op out of bounds.
    after = get_rng_states()
    moved_a_little = False
    try:
        for parent in float_parents:
            for sign in (1.0, -1.0):
                set_rng_states(start)
                try:
                    moved = replayer.run(layer, call, shift=(parent, sign))
                except Exception:  # moved out of the op's domain: the value is used
                    return None
                if _compare(moved, saved)[0] == "failed":
                    return None
                moved_a_little = moved_a_little or not torch.equal(moved.detach(), replayed.detach())
    finally:
        set_rng_states(after)
    if len(float_parents) < len(parents):  # e.g. x_int.to(y_float): the values are x's
        return None
    if bool((saved == saved.flatten()[0]).all()):
        why = "constant output (e.g. clamp(min=5, max=5)): its dependence on the parents cannot be tested"
    elif moved_a_little:  # used, but too weakly to tell the saved parent values from others
        why = ("output changes with its parents only within float tolerance (e.g. weights near "
               "zero, as gMLP's gates at init): their saved values cannot be proven")
    else:
        return LayerCheck(layer.label, "failed", "output does not change when its parents change: "
                          "the saved parent values may not be the ones the op used")
    return LayerCheck(layer.label, "skipped", why)


def _check_layer(
    replayer: _Replayer, layer: Layer, call: CallRecord, start: dict[str, torch.Tensor]
) -> LayerCheck:
    """Replays ``layer`` from the RNG state ``start`` (the current one) and checks the result."""
    saved = layer.tensor_contents
    if saved is None:
        return LayerCheck(layer.label, "failed", "output was not saved")
    if "generator" in call.kwargs:
        return LayerCheck(layer.label, "skipped", "random op with its own generator: not replayable")
    if layer.func_name in _UNINITIALISED:
        return LayerCheck(layer.label, "skipped", "uninitialised memory: its contents are arbitrary")
    try:
        replayed = replayer.run(layer, call)
        status, reason = _compare(replayed, saved)
    except Exception as error:  # a replay that cannot run is a failed check, not a crash
        return LayerCheck(layer.label, "failed", f"replay raised {type(error).__name__}: {error}")
    if status == "failed":
        return LayerCheck(layer.label, status, reason)
    verdict = _dependence(replayer, layer, call, saved, replayed, start)
    return verdict or LayerCheck(layer.label, status, reason)


# Builtin containers whose contents a pass may change (a cache dict, a list of outputs).
_CONTAINERS = (list, dict, set, OrderedDict, defaultdict)
# The module dicts whose entries are named like attributes (``layer1.0.weight``).
_MEMBERS = ("_parameters", "_buffers", "_modules")


@dataclass(slots=True)
class _SavedTensor:
    name: str
    tensor: torch.Tensor
    alias: torch.Tensor
    """``tensor.detach()``: the storage and layout it had, put back if a pass rebinds ``.data``."""
    values: torch.Tensor | None
    """A copy of its values; None if it could not be copied (``uncopied`` says why)."""
    version: int | None
    uncopied: str = ""


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except Exception:  # inference tensors keep no version counter
        return None


def _same_layout(tensor: torch.Tensor, alias: torch.Tensor) -> bool:
    if (tensor.layout, tensor.shape, tensor.dtype, tensor.device) != (
        alias.layout, alias.shape, alias.dtype, alias.device
    ):
        return False
    try:
        return tensor.layout != torch.strided or (
            tensor.stride(), tensor.storage_offset(), tensor.data_ptr()
        ) == (alias.stride(), alias.storage_offset(), alias.data_ptr())
    except RuntimeError:  # a subclass without storage (DTensor): its version has to tell
        return True


def _values_differ(tensor: torch.Tensor, values: torch.Tensor) -> bool:
    # ``param.data.add_(1)`` changes values without counting a version: compare them too
    if tensor.layout != torch.strided or tensor.is_meta:  # nothing to compare cheaply
        return False
    try:
        return not torch.equal(tensor, values)
    except Exception:  # a dtype or subclass torch.equal does not handle: copy back to be sure
        return True


def _changed(container: Any, contents: Any) -> bool:
    if len(container) != len(contents):
        return True
    if isinstance(container, dict):
        return any(key not in container or container[key] is not value for key, value in contents.items())
    if isinstance(container, list):
        return any(a is not b for a, b in zip(container, contents, strict=True))
    return {id(x) for x in container} != {id(x) for x in contents}


def _join(name: str, key: Any) -> str:
    return f"{name}.{key}" if name else str(key)


class _ModelState:
    """What a forward pass can change in a model, noted so that :meth:`restore` can put it back.

    Everything reachable from the model through module attributes and builtin containers:
    each module's ``__dict__`` (attributes a pass rebinds, adds or deletes: ``self.cache = x``,
    the ``weight`` that old-style ``weight_norm`` recomputes), the contents of lists, dicts and
    sets (caches a pass fills), the values of tensors (parameters, buffers, tensor attributes)
    and the states of generators. Only tensor values are copied; other objects are kept by
    reference, so changes inside them, or outside the model, are not undone.
    """

    def __init__(self, model: nn.Module) -> None:
        self.problems: dict[str, str] = {}
        """Name -> why, for the state that could not be put back."""
        self._containers: list[tuple[Any, Any]] = []
        self._tensors: list[_SavedTensor] = []
        self._generators: list[tuple[torch.Generator, torch.Tensor]] = []
        seen: set[int] = set()
        todo: list[tuple[Any, str]] = [(model, "")]
        while todo:
            obj, name = todo.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                self._save_tensor(obj, name)
            elif isinstance(obj, torch.Generator):
                self._generators.append((obj, obj.get_state()))
            elif isinstance(obj, nn.Module):
                attributes = vars(obj)
                self._containers.append((attributes, dict(attributes)))
                for key, value in attributes.items():
                    if key in _MEMBERS and type(value) in _CONTAINERS:
                        seen.add(id(value))
                        self._containers.append((value, value.copy()))
                        todo += [(member, _join(name, k)) for k, member in value.items()]
                    else:
                        todo.append((value, _join(name, key)))
            elif type(obj) in _CONTAINERS:
                self._containers.append((obj, obj.copy()))
                items = obj.items() if isinstance(obj, dict) else enumerate(obj)
                todo += [(value, f"{name}[{key!r}]") for key, value in items]
            elif type(obj) is tuple:
                todo += [(value, f"{name}[{i}]") for i, value in enumerate(obj)]

    def _save_tensor(self, tensor: torch.Tensor, name: str) -> None:
        alias, values, uncopied = tensor, None, ""
        try:
            alias = tensor.detach()
            values = alias.clone()
        except Exception as error:  # a problem only if a pass then changes it
            uncopied = f"{type(error).__name__}: {error}"
        self._tensors.append(_SavedTensor(name, tensor, alias, values, _version(tensor), uncopied))

    def restore(self) -> None:
        """Puts everything noted back; what cannot be is added to :attr:`problems`."""
        for container, contents in self._containers:
            if _changed(container, contents):
                if isinstance(container, list):
                    container[:] = contents
                else:
                    container.clear()
                    container.update(contents)
        for saved in self._tensors:
            try:
                self._restore_tensor(saved)
            except Exception as error:
                self.problems[saved.name] = f"could not be put back ({type(error).__name__}: {error})"
        for generator, state in self._generators:
            generator.set_state(state)

    def _restore_tensor(self, saved: _SavedTensor) -> None:
        tensor = saved.tensor
        # an inference tensor (made under torch.inference_mode) can only be written in that mode
        with torch.inference_mode() if tensor.is_inference() else torch.no_grad():
            if not _same_layout(tensor, saved.alias):  # resized, or ``.data`` rebound
                tensor.data = saved.alias
            if saved.values is None:
                if _version(tensor) != saved.version:
                    self.problems[saved.name] = (
                        f"changed by the pass, and its values could not be copied beforehand "
                        f"({saved.uncopied})"
                    )
                return
            if _version(tensor) != saved.version or _values_differ(tensor, saved.values):
                tensor.copy_(saved.values)
                saved.version = _version(tensor)


def _host_rng_states() -> tuple[Any, Any]:
    """Python's and (once imported) NumPy's global RNG states, which torch's do not cover.

    Models draw from them on the host (wav2vec2's SpecAugment masks, layer drop): the plain run
    must draw what the captured one drew. NumPy is looked up, not imported: core needs no NumPy.
    """
    numpy = sys.modules.get("numpy")
    return random.getstate(), None if numpy is None else numpy.random.get_state()


def _set_host_rng_states(states: tuple[Any, Any]) -> None:
    random.setstate(states[0])
    if states[1] is not None:
        sys.modules["numpy"].random.set_state(states[1])


def _check_layers(history: ModelHistory, report: ValidationReport) -> None:
    """Replays every op of ``history`` in execution order, from the RNG state it started with."""
    replayer = _Replayer(history)
    # Later outputs of a multi-output random op (an LSTM with dropout: output, h_n, c_n) must
    # replay from the state the op started with, not from the one its first replay left.
    starts: dict[int, dict[str, torch.Tensor]] = {}
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
        start = starts.get(id(call))
        if start is None:
            start = get_rng_states()
            if layer.output_index is not None:
                starts[id(call)] = start
            report.checks.append(_check_layer(replayer, layer, call, start))
        else:
            after = get_rng_states()
            set_rng_states(start)
            report.checks.append(_check_layer(replayer, layer, call, start))
            set_rng_states(after)


def validation_report(
    model: nn.Module,
    input_args: Any,
    input_kwargs: Mapping[str, Any] | None = None,
    random_seed: int | None = None,
) -> ValidationReport:
    """Captures a pass with everything saved and checks every layer; see the module docstring.

    The model is left as it was found (its state is put back after each pass, see
    :class:`_ModelState`); state that could not be put back is named in ``report.unrestored``.
    """
    cap = Capture(model, "all", random_seed=random_seed, save_function_args=True)
    user_rng, host_rng = get_rng_states(), _host_rng_states()
    state = _ModelState(model)
    try:
        history, output = run_forward(cap, input_args, input_kwargs)
        # copied before the state is put back: an output may be the model's own buffer
        captured_tensors = [t.detach().clone() for t in iter_tensors(output)]
        del output  # with its autograd graph
        state.restore()  # the plain run starts where the captured one did
        report = ValidationReport(history.model_name)
        if random_seed is None:
            start = history.rng_states
        else:
            torch.manual_seed(random_seed)
            start = get_rng_states()
        set_rng_states(start)
        _set_host_rng_states(host_rng)
        plain_tensors = list(iter_tensors(model(*as_args(input_args), **dict(input_kwargs or {}))))
        if len(captured_tensors) != len(plain_tensors) or not all(
            torch.equal(a, b) for a, b in zip(captured_tensors, plain_tensors, strict=True)
        ):
            report.output_problem = "the captured pass's output differs from a plain run's"
        del plain_tensors  # with the plain pass's autograd graph
        set_rng_states(start)
        _check_layers(history, report)
    finally:
        state.restore()
        set_rng_states(user_rng)
        _set_host_rng_states(host_rng)
    report.unrestored = [f"{name}: {why}" for name, why in state.problems.items()]
    return report


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
