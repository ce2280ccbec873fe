"""The sequential runner: no order of batches can hang it, layers get statistics from exactly
the tokens that reach them, unreached layers are named, offloaded hidden states change
nothing, Ctrl-C unwinds cleanly, and no thread is started."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from conftest import tiny_model
from prunekit.calibration import CalibrationData, InputStats, RunOptions, run_sequential
from prunekit.config import Calibration, PruneConfig
from prunekit.errors import UnsupportedModelError
from prunekit.schedules import prune_oneshot
from prunekit.targets import select_layers


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM raises in the main thread, where every batch runs."""
    def boom(*_):
        raise TimeoutError(f"the runner did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Skipper(nn.Module):
    """``a`` then, only for batches whose first input is positive, ``b``; then ``c``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.a(h)
        if bool(h[0, 0, 0] > 0):
            h = h + self.b(h)
        return self.c(h)


class TailSkipper(nn.Module):
    """``a``, ``c``, then ``b`` only for batches whose first value is positive: the layer some
    batches skip is the block's last (the thread ring waited for it forever)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.c(self.a(h))
        if bool(h[0, 0, 0] > 0):
            h = h + self.b(h)
        return h


class Swapper(nn.Module):
    """Runs ``a`` then ``b``, or ``b`` then ``a`` when the first input is positive."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if bool(h[0, 0, 0] > 0):
            return self.a(self.b(h))
        return self.b(self.a(h))


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module], n: int = 2, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def batches(signs: list[float], d: int = 8, tokens: int = 5) -> CalibrationData:
    g = torch.Generator().manual_seed(0)
    items = []
    for s in signs:
        x = torch.randn(1, tokens, d, generator=g)
        x[0, 0, 0] = s * 10  # large enough that the sign survives layer a
        items.append(x)
    return CalibrationData.from_items(items)


def record(model: nn.Module, data: CalibrationData, order: str = "layer", modifies: bool = True):
    """Run the runner with a visitor that records every group's statistics."""
    layers = [select_layers(b, f"layers.{i}", ()) for i, b in enumerate(model.layers)]
    seen: dict[str, InputStats] = {}

    def visit(names: list[str], stats: InputStats) -> None:
        for n in names:
            seen[n] = stats

    with deadline(30):
        report = run_sequential(model, data, ("layers", model.layers), layers, visit, gram=True,
                                modifies=modifies, options=RunOptions(sequential=order, progress=False))
    return seen, report


@pytest.mark.parametrize("block", [Skipper, TailSkipper])
def test_a_batch_that_skips_a_layer_does_not_hang(block):
    """Regression: the thread-ring lockstep hung when a batch skipped the block's last layer
    (``TailSkipper``; 12 batches of one window each, as in the old bug report)."""
    torch.manual_seed(0)
    model = Stack(block, n=1)
    # which batches reach b depends on the layers before it: find out with a plain forward
    data = batches([(-1.0) ** i for i in range(12)])
    reach = []
    hook = model.layers[0].b.register_forward_pre_hook(lambda m, a: reach.append(a[0].reshape(-1, 8).clone()))
    with torch.no_grad():
        for batch in data:
            data.forward(model, batch)
    hook.remove()
    assert 0 < len(reach) < 12  # some batch skips b
    seen, report = record(model, data)
    assert report.unreached == []
    stats = seen["layers.0.b"]
    x = torch.cat(reach)  # the inputs of exactly the batches that reached b
    assert stats.tokens == x.shape[0]
    torch.testing.assert_close(stats.gram, x.t() @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["layer", "block"])
def test_a_layer_no_batch_reaches_is_named(order):
    torch.manual_seed(0)
    model = Stack(Skipper, n=1)
    with torch.no_grad():
        model.layers[0].a.weight.zero_()
        model.layers[0].a.bias.fill_(-1.0)  # every batch skips b
    seen, report = record(model, batches([1.0, 2.0]), order)
    assert report.unreached == ["layers.0.b"]
    assert set(seen) == {"layers.0.a", "layers.0.c"}


def test_data_dependent_order_is_an_error_not_a_hang():
    torch.manual_seed(0)
    model = Stack(Swapper, n=1)
    with pytest.raises(UnsupportedModelError, match="data-dependent order.*--sequential block"):
        record(model, batches([-1.0, 1.0]))
    assert not model.layers[0].a._forward_pre_hooks  # hooks are removed on the way out
    record(model, batches([-1.0, 1.0]), "block")  # the two-pass order handles it


def test_no_thread_is_started():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    before = threading.active_count()
    counts = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: counts.append(threading.active_count()))
    prune_oneshot(model, PruneConfig.from_method("wanda", calibration=Calibration(batch_size=2)), ids, progress=False)
    hook.remove()
    assert counts and max(counts) == before


def test_interrupt_unwinds_every_batch():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    def interrupt(module, args):
        calls.append(1)
        if len(calls) == 3:  # the third batch to reach this layer: others are paused in their forwards
            raise KeyboardInterrupt

    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, o: interrupt(m, a))
    with deadline(30), pytest.raises(KeyboardInterrupt):
        prune_oneshot(model, PruneConfig.from_method("sparsegpt", calibration=Calibration(batch_size=2)), ids,
                      progress=False)
    for m in model.modules():  # only the test's own hook is left
        assert len(m._forward_pre_hooks) == 0
    assert len(model.model.layers[0].mlp.up_proj._forward_hooks) == 1


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("order", ["layer", "block"])
def test_offloaded_hidden_states_change_nothing(offload, order):
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    prune_oneshot(a, PruneConfig.from_method("sparsegpt", calibration=Calibration(sequential=order)), ids,
                  progress=False)
    prune_oneshot(b, PruneConfig.from_method("sparsegpt", calibration=Calibration(sequential=order,
                                                                                   offload=offload)), ids,
                  progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_layers_sharing_an_input_are_pruned_as_one_group():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    layers = [select_layers(b, f"model.layers.{i}", ()) for i, b in enumerate(model.model.layers)]
    groups: list[list[str]] = []
    run_sequential(model, CalibrationData.from_ids(ids, 2), ("model.layers", model.model.layers), layers,
                   lambda names, stats: groups.append([n.split(".", 2)[-1] for n in names]), modifies=True,
                   options=RunOptions(progress=False))
    expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert groups == [[f"{i}.{n}" for n in g] for i in range(2) for g in expected]
