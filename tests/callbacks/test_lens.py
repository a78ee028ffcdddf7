"""The plain-loop driver: schedule, what is captured, failure safety, observer effect."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules import module as module_globals
from torch.optim import optimizer as optimizer_globals

import lens_core as lc
from lens_callbacks import Lens
from tests.callbacks.helpers import ListWriter, SmallCNN, SummariesOnly, batches


def nothing_installed(*models: torch.nn.Module) -> bool:
    """No mode, no process-wide hook, and no hook on the parameters of ``models``."""
    return (
        torch._C._len_torch_function_stack() == 0
        and not module_globals._global_forward_hooks
        and not module_globals._global_forward_pre_hooks
        and not optimizer_globals._global_optimizer_post_hooks
        and not optimizer_globals._global_optimizer_pre_hooks
        and not any(getattr(p, "_post_accumulate_grad_hooks", None) for m in models for p in m.parameters())
    )


def train(model: SmallCNN, lens: Lens | None, steps: int = 5, accumulate: int = 1) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    data = batches(steps * accumulate)
    for step in range(steps):
        for micro in range(accumulate):
            x, y = data[step * accumulate + micro]
            context = lens.step(step) if lens is not None else torch.enable_grad()
            with context:  # the whole step, its update included: the gradients the update used
                loss = F.cross_entropy(model(x), y) / accumulate
                loss.backward()
                if micro == accumulate - 1:
                    optimizer.step()
            losses.append(loss.item())
        optimizer.zero_grad()
    if lens is not None:
        lens.close()
    return losses


def test_schedule_and_record_contents() -> None:
    torch.manual_seed(0)
    writer = ListWriter()
    lens = Lens(SmallCNN(), layers="conv", every_n_steps=2, writers=[writer])
    train(lens.model, lens)  # type: ignore[arg-type]
    assert writer.steps == [0, 2, 4]
    assert writer.closed
    seen = writer.seen[0]
    assert seen.labels == ["conv2d_1_1", "conv2d_2_4"]
    assert set(seen.activations) == set(seen.labels) == set(seen.gradients)
    assert set(seen.parameter_gradients) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    assert seen.activations["conv2d_1_1"].numel == 4 * 4 * 8 * 8


def test_uncaptured_steps_install_nothing() -> None:
    lens = Lens(SmallCNN(), steps=[1], writers=[ListWriter()])
    states = []
    for step in range(3):
        with lens.step(step):
            states.append(nothing_installed())
    assert states == [True, False, True]
    assert nothing_installed()


def test_capturing_every_step_changes_nothing() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    twin = copy.deepcopy(model)
    plain_losses = train(model, None)
    captured_losses = train(twin, Lens(twin, every_n_steps=1, writers=[ListWriter()]))
    assert plain_losses == captured_losses
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_captured_gradients_equal_autograd_on_that_batch() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = batches(1)[0]
    reference = copy.deepcopy(model)
    out = {}
    handle = reference.conv2.register_forward_hook(lambda _m, _i, o: out.setdefault("conv2", o))
    expected = torch.autograd.grad(F.cross_entropy(reference(x), y), out["conv2"])[0]
    handle.remove()

    class Keep(ListWriter):
        def write(self, record):  # type: ignore[no-untyped-def]
            self.gradient = record.history["conv2"].gradient.clone()
            super().write(record)

    writer = Keep()
    lens = Lens(model, every_n_steps=1, writers=[writer])
    with lens.step(0):
        F.cross_entropy(model(x), y).backward()
    assert torch.equal(writer.gradient, expected)


def test_gradient_accumulation_window_is_one_capture() -> None:
    torch.manual_seed(0)
    writer = ListWriter()
    model = SmallCNN()
    lens = Lens(model, layers="fc", every_n_steps=2, writers=[writer], accumulate_grad_batches=2)
    train(model, lens, steps=3, accumulate=2)
    assert writer.steps == [0, 2]
    assert [seen.micro_batches for seen in writer.seen] == [2, 2]
    (label,) = writer.seen[0].labels
    assert writer.seen[0].activations[label].numel == 2 * 4 * 3  # both micro-batches pooled


def test_exception_mid_step_tears_down_and_propagates() -> None:
    model = SmallCNN()
    lens = Lens(model, every_n_steps=1, writers=[ListWriter()])
    with pytest.raises(RuntimeError, match="expected input"), lens.step(0):
        model(torch.randn(2, 3, 8, 8))
    assert nothing_installed()
    with lens.step(1):
        model(torch.randn(2, 1, 8, 8)).sum().backward()
    lens.close()
    assert lens.writers[0].steps == [1]  # type: ignore[attr-defined]


def test_writer_errors_are_reported_not_fatal_unless_strict() -> None:
    model = SmallCNN()
    writer = ListWriter(fail_at={0})
    lens = Lens(model, every_n_steps=1, writers=[writer])
    with pytest.warns(RuntimeWarning, match="ListWriter failed to write step 0.*disk full"):
        train(model, lens, steps=2)
    assert writer.steps == [1]
    strict = Lens(model, every_n_steps=1, writers=[ListWriter(fail_at={0})], strict=True)
    with pytest.raises(OSError, match="disk full"):
        train(model, strict, steps=1)
    assert nothing_installed()


def test_dict_batches() -> None:
    class DictModel(SmallCNN):
        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
            return super().forward(batch["image"])

    model = DictModel()
    writer = ListWriter()
    lens = Lens(model, layers="linear", every_n_steps=1, writers=[writer])
    with lens.step(0):
        model({"image": torch.randn(2, 1, 8, 8)}).sum().backward()
    metadata = lc.get_model_metadata(model, [{"image": torch.randn(2, 1, 8, 8)}])
    assert writer.seen[0].labels == [metadata["fc"].label]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps=0: use an int >= 1"),
        ({"steps": "10"}, TypeError, "steps='10': use a list of ints"),
        ({"steps": [-1]}, ValueError, "steps contains -1"),
        ({"when": 3}, TypeError, "when=3: use a callable"),
        ({"stages": ["training"]}, ValueError, r"stages=\['training'\]: choose from"),
        ({"bins": 0}, ValueError, "bins=0"),
        ({"bins": 70000}, ValueError, "bins=70000: use an int from 1 to 65536"),  # not mid-training
        ({"layers": 2.5}, TypeError, "layers=2.5 is not a layer selection"),
        ({"writers": [object()]}, TypeError, "has no write"),
        ({"accumulate_grad_batches": 0}, ValueError, "accumulate_grad_batches=0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Lens(SmallCNN(), **kwargs)  # type: ignore[arg-type]


def test_selection_that_matches_nothing_fails_at_the_first_capture() -> None:
    model = SmallCNN()
    lens = Lens(model, layers="lstm", every_n_steps=1, writers=[ListWriter()])
    with pytest.raises(lc.LayerNotFoundError, match="layers='lstm' matches no layer"), lens.step(0):
        model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert nothing_installed()


def test_compiled_modules_run_eagerly_on_captured_steps() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = torch.compile(model, backend="eager")
    writer = ListWriter()
    lens = Lens(compiled, layers="conv", steps=[1], writers=[writer])
    outputs = []
    for step in range(3):
        with lens.step(step):
            out = compiled(torch.randn(2, 1, 8, 8))
            out.sum().backward()
        outputs.append(out)
    lens.close()
    assert writer.steps == [1]
    assert writer.seen[0].labels == ["conv2d_1_1", "conv2d_2_4"]
    assert nothing_installed()


def test_summaries_are_made_during_the_step_only_when_no_writer_needs_the_tensors(tmp_path: Path) -> None:
    model = SmallCNN()
    assert Lens(model, writers=[]).summarize_as_made
    assert Lens(model, writers=[SummariesOnly()]).summarize_as_made
    assert Lens(model, log_dir=tmp_path).summarize_as_made  # the disk writer, summaries only
    assert not Lens(model, log_dir=tmp_path, save_tensors=True).summarize_as_made
    assert not Lens(model, writers=[ListWriter()]).summarize_as_made  # says nothing: may read them
    assert not Lens(model, writers=[], accumulate_grad_batches=2).summarize_as_made  # pooled at the end


def test_summaries_made_during_the_step_equal_those_made_after_it() -> None:
    seen = {}
    for as_made in (True, False):
        torch.manual_seed(0)
        model, writer = SmallCNN(), SummariesOnly()
        lens = Lens(model, every_n_steps=1, writers=[writer])
        lens.summarize_as_made = as_made
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step, (x, y) in enumerate(batches(3, size=64)):  # conv outputs of 16384 values
            with lens.step(step):
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            optimizer.zero_grad()
        lens.close()
        seen[as_made] = writer.seen
    assert seen[True] == seen[False]
    assert seen[True][0].gradients["conv2d_1_1"].numel == 64 * 4 * 8 * 8


def test_a_written_step_leaves_no_tensor_behind() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    lens = Lens(model, every_n_steps=1, writers=[SummariesOnly()])
    x, y = batches(1)[0]
    with lens.step(0):
        out = model(x)
        F.cross_entropy(out, y).backward()
    storage = weakref.ref(out.untyped_storage())
    del out
    gc.collect()
    assert storage() is None


def test_a_backward_into_an_earlier_step_leaves_its_record_and_the_current_one_alone() -> None:
    seen = {}
    for as_made in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)  # outputs of 64 x 64 values: summarised as they are made
        writer = SummariesOnly()
        lens = Lens(model, every_n_steps=1, writers=[writer])
        lens.summarize_as_made = as_made
        h = torch.zeros(64, 64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "second backward pass" from the earlier step's layers
            for step in range(3):  # the hidden state carries each step's graph into the next
                with lens.step(step):
                    h = torch.tanh(model(h) + 1)
                    h.sum().backward(retain_graph=True)
        seen[as_made] = writer.seen
    assert seen[True] == seen[False]
    assert [sorted(s.gradients) for s in seen[True]] == [
        sorted(["linear_1_1", "output_1_2", "add_1_3", "tanh_1_4", "sum_1_5"]),
        *[sorted(["input_1_0", "linear_1_1", "output_1_2", "add_1_3", "tanh_1_4", "sum_1_5"])] * 2,
    ]
