"""A zoo of tiny models, one per forward-pass pattern a capture has to get right.

Each model is a few lines and exercises one thing: a loop, an in-place op, a dict input, a module
that returns its input... :data:`CASES` lists them with their inputs, for the parametrized tests
of ``test_toy_zoo.py``. Tensors are tiny so the whole zoo runs in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CASES", "CASES_BY_NAME", "ToyCase", "randn"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ToyCase:
    """One model of the zoo and the inputs of its forward call."""

    name: str
    """Test id."""
    make_model: Callable[[], nn.Module]
    """Builds the model (call it under a seed: parameters are random)."""
    make_inputs: Callable[[], Inputs]
    """Builds fresh ``(args, kwargs)``; deterministic, independent of the global RNG."""


def randn(*shape: int, seed: int = 0) -> Tensor:
    """A random tensor from its own generator, so inputs never touch the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _x(*shape: int, seed: int = 0) -> Callable[[], Inputs]:
    return lambda: ((randn(*shape, seed=seed),), {})


# -- plain structure ----------------------------------------------------------------------------


class SequentialMLP(nn.Module):
    """A stack of modules, run in order."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """Conv, pooling, flatten and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class BranchMerge(nn.Module):
    """Two branches from one tensor, merged by a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x).tanh() + self.b(x).sigmoid()


class BranchConcat(nn.Module):
    """Three branches concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(4, 2) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class Residual(nn.Module):
    """x + block(x), twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.block1(x)
        return x + self.block2(x)


class DenseSkips(nn.Module):
    """Each layer sees the concatenation of all earlier features (DenseNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 2)
        self.l2 = nn.Linear(6, 2)
        self.l3 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for layer in (self.l1, self.l2, self.l3):
            feats.append(layer(torch.cat(feats, dim=1)))
        return feats[-1]


# -- loops and repeated calls -------------------------------------------------------------------

RNN_STEPS = 4


class RNNCellLoop(nn.Module):
    """One linear cell reused at every time step: a layer with parameters and several passes."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(3 + 5, 5)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, time, 3)
        h = torch.zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], dim=1)))
        return h


PARAM_FREE_STEPS = 4


class ParamFreeLoop(nn.Module):
    """The same parameter-free op run in a loop."""

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(PARAM_FREE_STEPS):
            x = x * 2
        return x


class NestedParamFreeLoops(nn.Module):
    """A loop inside a loop: the inner op runs outer * inner times."""

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(2):
            for _ in range(3):
                x = x + 1
            x = x.sin()
        return x


class NestedLoopsModuleList(nn.Module):
    """Every layer of a ModuleList run in an outer loop: each layer has two passes."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(2):
            for layer in self.layers:
                x = torch.relu(layer(x))
        return x


class ModuleListLoop(nn.Module):
    """A loop over an nn.ModuleList: different modules, one pass each."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x).relu()
        return x


class ModuleCalledTwice(nn.Module):
    """The same module applied twice in a row: ``fc:1`` and ``fc:2``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.fc(x))


class ModuleCalledThrice(nn.Module):
    """One module applied to three different tensors, results summed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.fc(x * 2) + self.fc(x.flip(1))


class ParamFreeModuleReused(nn.Module):
    """A parameter-free module (ReLU) called at two places."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


class SharedSubmodule(nn.Module):
    """One module object registered under two names (``a`` and ``b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


class DataDependentWhile(nn.Module):
    """A loop whose number of iterations depends on tensor values."""

    def forward(self, x: Tensor) -> Tensor:
        while x.abs().sum() < 100:
            x = x * 2
        return x


def data_dependent_steps(x: Tensor) -> int:
    """How many times :class:`DataDependentWhile` doubles ``x``."""
    steps = 0
    while x.abs().sum() < 100:
        x = x * 2
        steps += 1
    return steps


class ScalarArgLoop(nn.Module):
    """Non-tensor positional arguments (an int step count and a float scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, steps: int, scale: float) -> Tensor:
        for _ in range(steps):
            x = self.fc(x) * scale
        return x


# -- module nesting -----------------------------------------------------------------------------


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class Middle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.relu())


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mid = Middle()

    def forward(self, x: Tensor) -> Tensor:
        return self.mid(x * 2)


class NestedModules(nn.Module):
    """Four levels of modules: ``outer.mid.inner.fc``; its output is the output of all four."""

    def __init__(self) -> None:
        super().__init__()
        self.outer = Outer()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.outer(x))


class Tree(nn.Module):
    """A module that contains a smaller copy of itself, ``depth`` levels deep."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.child = Tree(depth - 1) if depth > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        y = torch.tanh(self.fc(x))
        return y if self.child is None else y + self.child(y)


class NestedSequential(nn.Module):
    """Sequentials inside a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
            nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Tanh()),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ModuleDictHeads(nn.Module):
    """Heads in an nn.ModuleDict, outputs returned as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({"cls": nn.Linear(4, 3), "reg": nn.Linear(4, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x).relu()
        return {name: head(h) for name, head in self.heads.items()}


class SubmoduleReturnsDict(nn.Module):
    """A submodule whose output is a dict its parent unpacks."""

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            y = self.fc(x)
            return {"pos": y.relu(), "neg": (-y).relu()}

    def __init__(self) -> None:
        super().__init__()
        self.split = self.Split()

    def forward(self, x: Tensor) -> Tensor:
        parts = self.split(x)
        return parts["pos"] - parts["neg"]


class SubmoduleReturnsSameTensorTwice(nn.Module):
    """A submodule returning ``(y, y)``: one tensor in two output positions."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = self.fc(x)
            return y, y

    def __init__(self) -> None:
        super().__init__()
        self.twice = self.Twice()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.twice(x)
        return a * b


# -- functional forward and parameters ---------------------------------------------------------


class FunctionalOnly(nn.Module):
    """No submodules: F.* calls on nn.Parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.b1 = nn.Parameter(torch.randn(6))
        self.ln_weight = nn.Parameter(torch.ones(6))
        self.w2 = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(F.linear(x, self.w1, self.b1))
        h = F.layer_norm(h, (6,), self.ln_weight)
        return F.softmax(F.linear(h, self.w2), dim=-1)


class ParamDirect(nn.Module):
    """A parameter used directly in an expression: ``x @ self.W + self.b``."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.W + self.b


class ParameterListScales(nn.Module):
    """Parameters in an nn.ParameterList, applied in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = nn.ParameterList(nn.Parameter(torch.randn(4)) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        for scale in self.scales:
            x = x * scale
        return x


class WeightTying(nn.Module):
    """The embedding matrix reused as the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).tanh())


class Embedding(nn.Module):
    """Token embedding, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.emb(tokens).mean(dim=1))


def _tokens() -> Inputs:
    return (torch.tensor([[1, 2, 3], [4, 5, 9]]),), {}


# -- inputs of every shape ----------------------------------------------------------------------


class DictInput(nn.Module):
    """A dict of tensors as the only argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.fc(batch["x"]) * batch["mask"]


class ListInput(nn.Module):
    """A list of tensors as the only argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.stack([self.fc(x) for x in xs]).sum(0)


class TupleInput(nn.Module):
    """A tuple argument unpacked in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        a, b = pair
        return self.fc(a) - b


class NestedInput(nn.Module):
    """A dict holding a list and a tuple of tensors."""

    def forward(self, batch: dict[str, Any]) -> Tensor:
        a, b = batch["pair"]
        (c,) = batch["single"]
        return a * b + c


class KwargsInput(nn.Module):
    """Tensors passed as keyword arguments, one optional left out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, *, scale: Tensor, shift: Tensor | None = None) -> Tensor:
        y = self.fc(x) * scale
        return y if shift is None else y + shift


class ArgsAndKwargs(nn.Module):
    """Two positional tensors and a keyword mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        z = self.fc(x) + y
        return z if mask is None else z.masked_fill(mask, 0.0)


class UnusedInput(nn.Module):
    """An input tensor the forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, unused: Tensor) -> Tensor:
        return self.fc(x)


# -- outputs of every shape ---------------------------------------------------------------------


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.fc(x)
        return {"logits": y, "probs": y.softmax(-1)}


class ListOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> list[Tensor]:
        y = self.fc(x)
        return [y, y.relu(), y.exp()]


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.fc(x)
        return y, y.sum(dim=1)


class NestedOutput(nn.Module):
    """Tensors nested in a dict of a tuple of a list."""

    def forward(self, x: Tensor) -> dict[str, Any]:
        return {"a": (x + 1, [x * 2, x - 3]), "b": x.mean()}


class MixedOutput(nn.Module):
    """Tensors mixed with ints, strings, None and a float in the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[Any, ...]:
        y = self.fc(x)
        return y, 3, "tag", None, {"loss": y.pow(2).mean(), "scale": 2.5}


class _Pair(NamedTuple):
    logits: Tensor
    hidden: Tensor


class NamedTupleOutput(nn.Module):
    """A NamedTuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> _Pair:
        hidden = self.fc(x)
        return _Pair(hidden.softmax(-1), hidden)


@dataclass
class ToyOutput:
    """A dataclass output, like the output records of model libraries."""

    logits: Tensor
    hidden: Tensor
    note: str = "toy"


class DataclassOutput(nn.Module):
    """A dataclass output holding two tensors and a string."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> ToyOutput:
        hidden = self.fc(x)
        return ToyOutput(hidden.tanh(), hidden)


class SameTensorTwiceOutput(nn.Module):
    """The model returns one tensor in two positions."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x * 3
        return y, y


class ReturnsInput(nn.Module):
    """A model that returns its input unchanged (no op at all)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class IdentityModule(nn.Module):
    """A submodule (nn.Identity) that returns its input."""

    def __init__(self) -> None:
        super().__init__()
        self.ident = nn.Identity()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.ident(x))


class LossInForward(nn.Module):
    """The loss computed inside forward from a target input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.fc(x)
        return F.cross_entropy(logits, target), logits


# -- tensors from nowhere, buffers ------------------------------------------------------------


class CreatedTensors(nn.Module):
    """Tensors created inside forward: zeros, arange, ones_like, full, eye."""

    def forward(self, x: Tensor) -> Tensor:
        bias = torch.zeros(x.shape[1]) + torch.arange(x.shape[1])
        return (x + bias) * torch.ones_like(x) + torch.full((1, 4), 0.5) @ torch.eye(4)


class SeededRandomInForward(nn.Module):
    """torch.randn from a generator seeded inside forward (no global RNG)."""

    def forward(self, x: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(7)
        return x + torch.randn(x.shape, generator=gen)


class GlobalRandomInForward(nn.Module):
    """torch.rand from the global RNG: the capture must not shift it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rand_like(x) + torch.randn(4)


class BufferUsed(nn.Module):
    """Registered buffers used in forward (normalisation statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1, 1, 4))
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc((x - self.mean) * self.scale)


class BufferMutated(nn.Module):
    """A buffer updated in place by every forward call (a call counter, an EMA)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        return self.fc(x - self.ema)


# -- in-place ops -------------------------------------------------------------------------------


class InplaceReluModule(nn.Module):
    """nn.ReLU(inplace=True) overwriting the linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x)) * 2


class InplaceReluMethod(nn.Module):
    """``y2 = y.relu_()``: the saved linear output must keep its negative entries."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        y2 = y.relu_()
        return y2 + 1


class InplaceIAdd(nn.Module):
    """``y += 1`` on a linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        y += 1
        return y * 3


class InplaceAddMethod(nn.Module):
    """``y.add_(other)`` then ``y.mul_(2)``: a chain of in-place methods."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        y.add_(x).mul_(2)
        return y


class InplaceSetitem(nn.Module):
    """``y[:, 0] = 0``: item assignment returns nothing and changes ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        y[:, 0] = 0
        return y.sum(dim=1)


class InplaceOnView(nn.Module):
    """``y[0].mul_(2)`` inside a submodule: an in-place write through a view into ``y``."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            y = self.lin(x)
            y[0].mul_(2)
            return y

    def __init__(self) -> None:
        super().__init__()
        self.scale = self.Scale()

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(x) + 1


class InplaceOnInput(nn.Module):
    """The forward mutates its own input tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2)
        return self.fc(x)


class InplaceFunctionalDropout(nn.Module):
    """F.dropout with inplace=True in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return F.dropout(y, 0.5, training=True, inplace=True)


class OutKwarg(nn.Module):
    """``torch.mul(x, 2, out=buf)``: an op writing into a tensor made earlier in forward."""

    def forward(self, x: Tensor) -> Tensor:
        buf = torch.empty(2, 4)
        torch.mul(x, 2, out=buf)
        return buf + 1


class ItemInForward(nn.Module):
    """A Python number read from a tensor (``int(x.argmax())``) steers the computation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * int(x.argmax()) + x.sum().item()


class FFT(nn.Module):
    """A complex intermediate from torch.fft."""

    def forward(self, x: Tensor) -> Tensor:
        spectrum = torch.fft.rfft(x, dim=-1)
        return torch.fft.irfft(spectrum * 2, n=x.shape[-1], dim=-1) + spectrum.abs().sum()


class ModuleCreatedInForward(nn.Module):
    """A module built and called inside forward: not a submodule of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return nn.Softplus()(self.fc(x)) * nn.Identity()(x)


class ExceptionCaughtInside(nn.Module):
    """A submodule raises; forward catches the error and carries on."""

    class Fails(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            y = x.exp()
            raise ValueError(f"toy failure after an op of shape {tuple(y.shape)}")

    def __init__(self) -> None:
        super().__init__()
        self.fails = self.Fails()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        try:
            x = self.fails(x)
        except ValueError:
            x = x * 2
        return self.fc(x)


class Recursive(nn.Module):
    """A module that calls itself ``depth`` times."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, depth: int = 3) -> Tensor:
        x = torch.tanh(self.fc(x))
        return x if depth == 1 else self(x, depth - 1)


class RecursiveSubmodule(nn.Module):
    """A submodule that calls itself: ``rec:1`` encloses ``rec:2`` which encloses ``rec:3``."""

    def __init__(self) -> None:
        super().__init__()
        self.rec = Recursive()

    def forward(self, x: Tensor) -> Tensor:
        return self.rec(x) * 2


def _weight_norm_linear() -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))


# -- views, control flow, grad mode -------------------------------------------------------------


class Views(nn.Module):
    """view, reshape, transpose, permute, slicing, unsqueeze, expand, .T and contiguous."""

    def forward(self, x: Tensor) -> Tensor:  # x: (2, 3, 4)
        a = x.view(2, 12).reshape(2, 3, 4).transpose(1, 2)  # (2, 4, 3)
        b = a.permute(2, 0, 1)[1:, :, ::2]  # (2, 2, 2)
        c = b.unsqueeze(0).expand(3, 2, 2, 2).contiguous()
        return c.flatten(1) + x[0, :2, :2].T.reshape(1, 4).repeat(1, 2)


class NoGradInside(nn.Module):
    """A statistic computed under torch.no_grad() inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            center = self.fc(x).mean(0, keepdim=True)
        return self.fc(x) - center


class Detach(nn.Module):
    """A detached copy of an activation used beside the original."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return y * y.detach().sigmoid()


class ConditionalOnValue(nn.Module):
    """Python control flow on a tensor value: which module runs depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(4, 4)
        self.neg = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.pos(x)
        return self.neg(x)


def _positive() -> Inputs:
    return (randn(2, 4).abs(),), {}


def _negative() -> Inputs:
    return (-randn(2, 4).abs(),), {}


class MaskedWhere(nn.Module):
    """Boolean masks: comparison, where, masked_fill, clamp."""

    def forward(self, x: Tensor) -> Tensor:
        mask = x > 0
        y = torch.where(mask, x, torch.zeros_like(x))
        return y.masked_fill(~mask, -1.0).clamp(-0.5, 0.5)


class IndexOps(nn.Module):
    """index_select, gather and argmax with integer index tensors made in forward."""

    def forward(self, x: Tensor) -> Tensor:
        idx = torch.tensor([0, 2])
        picked = x.index_select(1, idx)
        best = x.argmax(dim=1, keepdim=True)
        return picked.sum(1, keepdim=True) + torch.gather(x, 1, best)


class Reductions(nn.Module):
    """sum, mean, amax, logsumexp and norm to scalars and vectors."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sum() + x.mean(0) + x.amax(1).sum() + torch.logsumexp(x, 1).mean() + x.norm()


class DtypeChanges(nn.Module):
    """Conversions between float32, float64 and integer tensors."""

    def forward(self, x: Tensor) -> Tensor:
        y = x.double() * 3
        counts = (y > 0).long().sum(1, keepdim=True)
        return y.float() + counts.to(torch.float32)


# -- stochastic and normalising layers ---------------------------------------------------------


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc(x))


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(x)).relu()


class ConvBatchNorm2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.bn(self.conv(x)), 1).flatten(1)


class Norms(nn.Module):
    """LayerNorm and GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.ln(x))


class PoolUpsample(nn.Module):
    """Pooling and interpolation."""

    def forward(self, x: Tensor) -> Tensor:  # (1, 1, 4, 4)
        down = F.avg_pool2d(x, 2)
        return F.interpolate(down, scale_factor=2.0, mode="nearest") + F.max_pool2d(x, 3, 1, 1)


class Conv1dTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.deconv = nn.ConvTranspose1d(3, 2, 3)

    def forward(self, x: Tensor) -> Tensor:  # (1, 2, 6)
        return self.deconv(self.conv(x).relu())


# -- recurrent and attention layers ------------------------------------------------------------


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, (h, c) = self.lstm(x)
        return self.fc(out[:, -1]), h, c


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 3, num_layers=2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, h = self.gru(x)
        return out, h


class MultiheadAttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, weights = self.mha(x, x, x)
        return out, weights


class TransformerLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class HandAttention(nn.Module):
    """Scaled dot-product attention written out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:  # (2, 3, 4)
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(4)
        return scores.softmax(dim=-1) @ self.v(x)


class MatmulEinsum(nn.Module):
    """matmul, bmm, einsum and outer products."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> Tensor:  # (2, 3, 4)
        a = torch.einsum("bti,ij->btj", x, self.W)
        b = torch.bmm(a, x.transpose(1, 2))  # (2, 3, 3)
        return torch.matmul(b, x) + torch.outer(x[0, 0], x[1, 0])[:3]  # (2, 3, 4)


# -- multi-output ops, lists of tensors ----------------------------------------------------------


class SplitOutputs(nn.Module):
    """torch.split into three pieces: one layer per piece."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: Tensor) -> Tensor:
        a, b, c = torch.split(self.fc(x), 2, dim=1)
        return a * b + c


class ChunkOutputs(nn.Module):
    """Tensor.chunk, GLU style."""

    def forward(self, x: Tensor) -> Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * gate.sigmoid()


class UnbindStack(nn.Module):
    """unbind into rows, then stack and cat them back."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.unbind(0)
        return torch.cat([torch.stack(rows[::-1]), torch.stack(list(rows), dim=1).T])


class MaxWithIndices(nn.Module):
    """``x.max(dim)``: a float and an int64 output from one op."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = x.max(dim=1)
        return values * 2, indices + 1


class CatStackLists(nn.Module):
    """cat and stack of Python lists built in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for k in range(3):
            outs.append(self.fc(x) * k)
        return torch.cat(outs, dim=1) + torch.stack(outs, dim=1).flatten(1)


# -- custom autograd --------------------------------------------------------------------------


class _ScaledSquare(torch.autograd.Function):
    """y = 3 x^2 with a hand-written backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return 3 * x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * 6 * x


class CustomFunction(nn.Module):
    """A custom torch.autograd.Function between two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_ScaledSquare.apply(self.fc1(x)))


class RaisesInForward(nn.Module):
    """Fails half-way through forward (for the clean-up tests, not in :data:`CASES`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x).relu()
        raise ValueError(f"toy failure after an op of shape {tuple(y.shape)}")


def _eval(model_cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: model_cls().eval()


def _case(name: str, make_model: Callable[[], nn.Module], make_inputs: Callable[[], Inputs]) -> ToyCase:
    return ToyCase(name, make_model, make_inputs)


CASES: list[ToyCase] = [
    _case("sequential_mlp", SequentialMLP, _x(2, 4)),
    _case("conv_net", ConvNet, _x(1, 1, 4, 4)),
    _case("branch_merge", BranchMerge, _x(2, 4)),
    _case("branch_concat", BranchConcat, _x(2, 4)),
    _case("residual", Residual, _x(2, 4)),
    _case("dense_skips", DenseSkips, _x(2, 4)),
    _case("rnn_cell_loop", RNNCellLoop, _x(2, RNN_STEPS, 3)),
    _case("param_free_loop", ParamFreeLoop, _x(2, 4)),
    _case("nested_param_free_loops", NestedParamFreeLoops, _x(2, 4)),
    _case("nested_loops_module_list", NestedLoopsModuleList, _x(2, 4)),
    _case("module_list_loop", ModuleListLoop, _x(2, 4)),
    _case("module_called_twice", ModuleCalledTwice, _x(2, 4)),
    _case("module_called_thrice", ModuleCalledThrice, _x(2, 4)),
    _case("param_free_module_reused", ParamFreeModuleReused, _x(2, 4)),
    _case("shared_submodule", SharedSubmodule, _x(2, 4)),
    _case("data_dependent_while", DataDependentWhile, _x(2, 4)),
    _case("scalar_arg_loop", ScalarArgLoop, lambda: ((randn(2, 4), 3, 0.5), {})),
    _case("nested_modules", NestedModules, _x(2, 4)),
    _case("tree", Tree, _x(2, 4)),
    _case("nested_sequential", NestedSequential, _x(2, 4)),
    _case("module_dict_heads", ModuleDictHeads, _x(2, 4)),
    _case("submodule_returns_dict", SubmoduleReturnsDict, _x(2, 4)),
    _case("submodule_returns_same_tensor_twice", SubmoduleReturnsSameTensorTwice, _x(2, 4)),
    _case("functional_only", FunctionalOnly, _x(2, 4)),
    _case("param_direct", ParamDirect, _x(2, 4)),
    _case("parameter_list_scales", ParameterListScales, _x(2, 4)),
    _case("weight_tying", WeightTying, _tokens),
    _case("embedding", Embedding, _tokens),
    _case("dict_input", DictInput, lambda: (({"x": randn(2, 4), "mask": randn(2, 4, seed=1) > 0},), {})),
    _case("list_input", ListInput, lambda: (([randn(2, 4), randn(2, 4, seed=1), randn(2, 4, seed=2)],), {})),
    _case("tuple_input", TupleInput, lambda: (((randn(2, 4), randn(2, 4, seed=1)),), {})),
    _case(
        "nested_input",
        NestedInput,
        lambda: (({"pair": [randn(2, 4), randn(2, 4, seed=1)], "single": (randn(4, seed=2),)},), {}),
    ),
    _case("kwargs_input", KwargsInput, lambda: ((randn(2, 4),), {"scale": randn(4, seed=1)})),
    _case(
        "args_and_kwargs",
        ArgsAndKwargs,
        lambda: ((randn(2, 4), randn(2, 4, seed=1)), {"mask": randn(2, 4, seed=2) > 0}),
    ),
    _case("unused_input", UnusedInput, lambda: ((randn(2, 4), randn(3, seed=1)), {})),
    _case("dict_output", DictOutput, _x(2, 4)),
    _case("list_output", ListOutput, _x(2, 4)),
    _case("tuple_output", TupleOutput, _x(2, 4)),
    _case("nested_output", NestedOutput, _x(2, 4)),
    _case("mixed_output", MixedOutput, _x(2, 4)),
    _case("named_tuple_output", NamedTupleOutput, _x(2, 4)),
    _case("dataclass_output", DataclassOutput, _x(2, 4)),
    _case("same_tensor_twice_output", SameTensorTwiceOutput, _x(2, 4)),
    _case("returns_input", ReturnsInput, _x(2, 4)),
    _case("identity_module", IdentityModule, _x(2, 4)),
    _case("loss_in_forward", LossInForward, lambda: ((randn(3, 4), torch.tensor([0, 2, 1])), {})),
    _case("created_tensors", CreatedTensors, _x(2, 4)),
    _case("seeded_random_in_forward", SeededRandomInForward, _x(2, 4)),
    _case("global_random_in_forward", GlobalRandomInForward, _x(2, 4)),
    _case("buffer_used", BufferUsed, _x(2, 4)),
    _case("buffer_mutated", BufferMutated, _x(2, 4)),
    _case("inplace_relu_module", InplaceReluModule, _x(2, 4)),
    _case("inplace_relu_method", InplaceReluMethod, _x(2, 4)),
    _case("inplace_iadd", InplaceIAdd, _x(2, 4)),
    _case("inplace_add_method", InplaceAddMethod, _x(2, 4)),
    _case("inplace_setitem", InplaceSetitem, _x(2, 4)),
    _case("inplace_on_view", InplaceOnView, _x(2, 4)),
    _case("inplace_on_input", InplaceOnInput, _x(2, 4)),
    _case("inplace_functional_dropout", InplaceFunctionalDropout, _x(2, 4)),
    _case("out_kwarg", OutKwarg, _x(2, 4)),
    _case("item_in_forward", ItemInForward, _x(2, 4)),
    _case("fft", FFT, _x(2, 4)),
    _case("module_created_in_forward", ModuleCreatedInForward, _x(2, 4)),
    _case("exception_caught_inside", ExceptionCaughtInside, _x(2, 4)),
    _case("recursive_submodule", RecursiveSubmodule, _x(2, 4)),
    _case("recursive_root", Recursive, _x(2, 4)),
    _case("weight_norm_parametrization", _weight_norm_linear, _x(2, 4)),
    _case("views", Views, _x(2, 3, 4)),
    _case("no_grad_inside", NoGradInside, _x(2, 4)),
    _case("detach", Detach, _x(2, 4)),
    _case("conditional_true", ConditionalOnValue, _positive),
    _case("conditional_false", ConditionalOnValue, _negative),
    _case("masked_where", MaskedWhere, _x(2, 4)),
    _case("index_ops", IndexOps, _x(2, 4)),
    _case("reductions", Reductions, _x(2, 4)),
    _case("dtype_changes", DtypeChanges, _x(2, 4)),
    _case("dropout_train", DropoutNet, _x(2, 4)),
    _case("dropout_eval", _eval(DropoutNet), _x(2, 4)),
    _case("batchnorm_train", BatchNormNet, _x(3, 4)),
    _case("batchnorm_eval", _eval(BatchNormNet), _x(3, 4)),
    _case("conv_batchnorm2d_train", ConvBatchNorm2d, _x(2, 1, 3, 3)),
    _case("norms", Norms, _x(2, 4)),
    _case("pool_upsample", PoolUpsample, _x(1, 1, 4, 4)),
    _case("conv1d_transpose", Conv1dTranspose, _x(1, 2, 6)),
    _case("lstm", LSTMNet, _x(2, 3, 4)),
    _case("gru", GRUNet, _x(3, 2, 4)),
    _case("multihead_attention", MultiheadAttentionNet, _x(2, 3, 8)),
    _case("multihead_attention_eval", _eval(MultiheadAttentionNet), _x(2, 3, 8)),
    _case("transformer_layer", TransformerLayer, _x(2, 3, 8)),
    _case("hand_attention", HandAttention, _x(2, 3, 4)),
    _case("matmul_einsum", MatmulEinsum, _x(2, 3, 4)),
    _case("split_outputs", SplitOutputs, _x(2, 4)),
    _case("chunk_outputs", ChunkOutputs, _x(2, 4)),
    _case("unbind_stack", UnbindStack, _x(2, 2)),
    _case("max_with_indices", MaxWithIndices, _x(2, 4)),
    _case("cat_stack_lists", CatStackLists, _x(2, 4)),
    _case("custom_function", CustomFunction, _x(2, 4)),
]
CASES_BY_NAME: dict[str, ToyCase] = {case.name: case for case in CASES}
if len(CASES_BY_NAME) != len(CASES):
    raise RuntimeError("two toy cases share a name")
