"""How much a full capture costs: plain forward vs ``lens_core.log_forward_pass(layers_to_save="all")``.

Prints a markdown table, one row per model, measured side by side in one run on CPU, plus
TorchLens columns when ``torchlens`` is installed. Times are medians over ``--repeats`` rounds; each
round runs plain, lens_core and TorchLens back to back, so drift in machine load hits all alike.

    python benchmarks/capture_overhead.py                    # everything
    python benchmarks/capture_overhead.py --models resnet18 recurrent --repeats 15
    python benchmarks/capture_overhead.py --quick            # smoke test: tiny inputs, 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lens_core

THREADS = 2  # fixed so that runs on different machines and days compare


class Mixer(nn.Module):
    """A small MLP-mixer: many cheap ops (layer norms, transposes, GELUs) on mid-sized tensors."""

    def __init__(self, depth: int = 8, dim: int = 256, patches: int = 64) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 16, stride=16)  # (B, 3, 128, 128) -> (B, dim, 8, 8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm1": nn.LayerNorm(dim),
                "tokens": nn.Sequential(nn.Linear(patches, 128), nn.GELU(), nn.Linear(128, patches)),
                "norm2": nn.LayerNorm(dim),
                "channels": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            })
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        for b in self.blocks:
            x = x + b["tokens"](b["norm1"](x).transpose(1, 2)).transpose(1, 2)
            x = x + b["channels"](b["norm2"](x))
        return self.head(x.mean(1))


class Recurrent(nn.Module):
    """A hand-written RNN unrolled over the sequence: small tensors, so per-op cost dominates."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.inp, self.rec, self.norm = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, steps, dim)
        h = x.new_zeros(x.shape[0], x.shape[2])
        for t in range(x.shape[1]):
            h = torch.tanh(self.norm(self.inp(x[:, t]) + self.rec(h)))
        return self.head(h)


class LSTMLoop(nn.Module):
    """``nn.LSTMCell`` stepped in a Python loop: a few small ops per step, so per-op cost dominates."""

    def __init__(self, dim: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.cell, self.head = nn.LSTMCell(dim, hidden), nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, steps, dim)
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class GPT2(nn.Module):
    """A randomly initialised ``transformers.GPT2Model`` (no LM head) that returns its last hidden state.

    The benchmark's helpers need a tensor out, not a ``ModelOutput``. Eager attention keeps the
    attention matmuls and softmax visible as separate ops instead of one fused SDPA call.
    """

    def __init__(self, layers: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model  # lazy: only runs that ask for gpt2 pay the import

        config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, use_cache=False,
                            attn_implementation="eager")
        self.gpt2 = GPT2Model(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, tokens) -> (B, tokens, 768)
        return self.gpt2(input_ids).last_hidden_state


def _models(quick: bool) -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    from torchvision import models as tv

    b, px = (1, 64) if quick else (2, 224)

    def image() -> torch.Tensor:
        return torch.randn(b, 3, px, px)

    return {
        "resnet18": lambda: (tv.resnet18(), image()),
        "mobilenet_v3_small": lambda: (tv.mobilenet_v3_small(), image()),
        "efficientnet_b0": lambda: (tv.efficientnet_b0(), image()),
        # init_weights=False: torchvision's default init draws truncated normals through scipy (slow)
        "googlenet": lambda: (tv.googlenet(aux_logits=False, init_weights=False), image()),
        "transformer": lambda: (
            # With grad on, plain runs the same Python path as a capture; under --no-grad plain takes
            # PyTorch's fused eval fast path (one op per layer), which a capture cannot see into.
            nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True), 4),
            torch.randn(b, 16 if quick else 128, 256),
        ),
        "mlp_mixer": lambda: (Mixer(depth=2 if quick else 8), torch.randn(b, 3, 128, 128)),
        "recurrent": lambda: (Recurrent(), torch.randn(b, 5 if quick else 50, 128)),
        "gpt2": lambda: (GPT2(2 if quick else 12), torch.randint(0, 50257, (b, 16 if quick else 128))),
        "lstm": lambda: (LSTMLoop(), torch.randn(b, 5 if quick else 50, 128)),
    }


class _TorchLens:
    """The installed TorchLens, whichever API it has (``trace`` since 2.0, ``log_forward_pass`` before)."""

    def __init__(self, tl: Any) -> None:
        self.tl, self.version = tl, getattr(tl, "__version__", "?")
        # TorchLens wraps torch's functions on first use and leaves them wrapped. Wrap before and
        # unwrap after each of its runs, outside the timer, so plain and lens_core see a pristine torch.
        try:
            from torchlens.backends.torch.wrappers import unwrap_torch, wrap_torch
        except ImportError:
            wrap_torch = unwrap_torch = lambda: None
        self.wrap, self.unwrap = wrap_torch, unwrap_torch

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Any:
        if hasattr(self.tl, "trace"):  # saves every layer by default
            return self.tl.trace(model, x)
        return self.tl.log_forward_pass(model, x, layers_to_save="all", vis_opt="none")


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, int]:
    """Seconds ``fn(*args)`` took and the length of what it returned (dropped before the next timing)."""
    gc.collect()  # so that collecting the previous run's garbage does not land inside this timing
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, len(out) if hasattr(out, "__len__") else 0


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[()]:
    model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return ()


def _captured_train_step(model: nn.Module, x: torch.Tensor) -> tuple[()]:
    """Forward and backward with every activation and its gradient recorded."""
    with lens_core.capture(model, "all", gradients=True):
        out = model(x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return ()


def _per_op(times: dict[str, list[float]], key: str, ops: int) -> float:
    """Microseconds per op: the median over rounds of (this run - the plain run of the same round).

    Pairing each run with the plain run beside it cancels most of the machine's drift.
    """
    return statistics.median(t - p for t, p in zip(times[key], times["plain"], strict=True)) / ops * 1e6


def _measure(model: nn.Module, x: torch.Tensor, tl: _TorchLens | None, warmup: int, repeats: int,
             backward: bool) -> list[str]:
    """One table row. Each round runs plain, lens_core, TorchLens in turn; medians of the rounds."""
    times: dict[str, list[float]] = {"plain": [], "ours": [], "meta": [], "tl": [], "fb": [], "fb_ours": []}
    ops = tl_entries = 0
    for i in range(warmup + repeats):
        rnd = {"plain": _timed(model, x)[0]}
        rnd["ours"], ops = _timed(lens_core.log_forward_pass, model, x)  # layers_to_save="all"
        rnd["meta"] = _timed(lens_core.get_model_metadata, model, x)[0]  # nothing saved or copied
        if backward:
            rnd["fb"] = _timed(_train_step, model, x)[0]
            rnd["fb_ours"] = _timed(_captured_train_step, model, x)[0]
        if tl:
            tl.wrap()
            rnd["tl"], tl_entries = _timed(tl, model, x)
            tl.unwrap()
        if i >= warmup:
            for key, seconds in rnd.items():
                times[key].append(seconds)
    plain, ours = statistics.median(times["plain"]), statistics.median(times["ours"])
    row = [str(ops), f"{plain * 1e3:.1f}", f"{ours * 1e3:.1f}", f"{ours / plain:.2f}",
           f"{_per_op(times, 'ours', ops):.1f}", f"{_per_op(times, 'meta', ops):.1f}"]
    if backward:
        fb, fb_ours = statistics.median(times["fb"]), statistics.median(times["fb_ours"])
        row += [f"{fb * 1e3:.1f}", f"{fb_ours * 1e3:.1f}", f"{fb_ours / fb:.2f}"]
    if tl:
        theirs = statistics.median(times["tl"])
        row += [f"{theirs * 1e3:.1f}", f"{theirs / plain:.2f}", f"{_per_op(times, 'tl', ops):.1f}",
                str(tl_entries)]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = list(_models(False))
    parser.add_argument("--models", nargs="+", choices=choices, default=choices, metavar="NAME",
                        help=f"subset to run (default all: {', '.join(choices)})")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per model (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per model first (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny inputs, 1 repeat, no warm-up")
    parser.add_argument("--no-grad", action="store_true", help="run under torch.no_grad() (default: grad on)")
    parser.add_argument("--no-torchlens", action="store_true", help="skip TorchLens even if installed")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    repeats, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    tl = None
    if not args.no_torchlens:
        with contextlib.suppress(ImportError):
            import torchlens

            tl = _TorchLens(torchlens)
    backward = not args.no_grad
    head = ["model", "ops", "plain ms", "lens_core ms", "ratio", "us/op", "us/op, nothing saved"]
    head += ["fwd+bwd ms", "+ all grads ms", "ratio"] if backward else []
    head += ["TorchLens ms", "ratio", "us/op", "TL entries"] if tl else []
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))

    started, rows = time.perf_counter(), []
    factories = _models(args.quick)
    with torch.no_grad() if args.no_grad else contextlib.nullcontext():
        for name in args.models:
            model, x = factories[name]()
            rows.append([name, *_measure(model.eval(), x, tl, warmup, repeats, backward)])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)

    ours = statistics.median(float(r[5]) for r in rows)
    bare = statistics.median(float(r[6]) for r in rows)
    tl_col = 12 if backward else 9
    theirs = ""
    if tl:
        theirs = f"TorchLens {tl.version}: {statistics.median(float(r[tl_col]) for r in rows):.1f} us"
    print(
        f"\nmedian overhead per op: lens_core {ours:.1f} us (everything saved), {bare:.1f} us (nothing "
        f"saved); {theirs or 'TorchLens not installed'}. "
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, "
        f"grad {'disabled' if args.no_grad else 'enabled'}, eval mode, medians of {repeats} round(s), "
        f"{'quick inputs' if args.quick else 'batch 2'}, took {time.perf_counter() - started:.0f} s.\n"
        "us/op = median over rounds of (capture - plain of the same round) / ops, where ops = the "
        "layers lens_core recorded; "
        "TorchLens's column uses the same count (its own 'TL entries' also list buffer reads). "
        "fwd+bwd: forward and backward of sum(output); '+ all grads' records every activation "
        "and its gradient during it. 'nothing saved' is get_model_metadata: interception and "
        "bookkeeping without keeping or copying any output."
    )


if __name__ == "__main__":
    main()
