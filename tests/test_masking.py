"""Masks survive training: exact zeros through many optimizer steps, whatever the optimizer."""
import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, OptimizerMismatchError
from prunekit.masking import Masker, prunable_parameters, sparsity_report
from prunekit.training import SparsityController


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def random_masks(params, fraction=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < fraction for n, p in params.items()}


def train_steps(model, opt, ctrl, steps, scaler=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        if ctrl is not None:
            ctrl.step()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "gradscaler"])
def test_pruned_weights_stay_exactly_zero(opt_name, amp):
    model = small_net()
    opt = OPTIMIZERS[opt_name](model.parameters())
    params = prunable_parameters(model)
    masks = random_masks(params)
    # Momentum and Adam moments are built up densely first, so they would revive pruned weights.
    train_steps(model, opt, None, 5)
    ctrl = SparsityController(model, opt, masks=masks)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
    before = {n: p.detach().clone() for n, p in params.items()}
    train_steps(model, opt, ctrl, 60, scaler=scaler)
    for n, p in params.items():
        assert int((p[masks[n]] != 0).sum()) == 0, n
        assert not torch.equal(p[~masks[n]], before[n][~masks[n]])  # the rest did train
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert int((value[masks[n]] != 0).sum()) == 0  # no stale momentum
    assert ctrl.sparsity() == pytest.approx(sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))


def test_gradients_are_masked_before_the_optimizer_sees_them():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = prunable_parameters(model)
    masks = random_masks(params, 0.5)
    SparsityController(model, opt, masks=masks)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    for n, p in params.items():
        assert int((p.grad[masks[n]] != 0).sum()) == 0
        assert int((p.grad[~masks[n]] != 0).sum()) > 0


def test_make_permanent_removes_hooks_and_keeps_zeros():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = prunable_parameters(model)
    masks = random_masks(params, 0.7)
    ctrl = SparsityController(model, opt, masks=masks)
    ctrl.make_permanent()
    report = sparsity_report(model)
    expected = sum(int(m.sum()) for m in masks.values())
    assert report["__total__"]["zeros"] == expected
    model(torch.randn(4, 1, 8, 8)).sum().backward()  # hooks gone: gradients are dense again
    name = "3.weight"
    assert int((params[name].grad[masks[name]] != 0).sum()) > 0


def test_optimizer_that_does_not_own_the_model_is_rejected():
    model, other = small_net(0), small_net(1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(OptimizerMismatchError, match="does not own"):
        SparsityController(model, opt)
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(OptimizerMismatchError, match="3.weight|5.weight"):
        SparsityController(model, partial)


def test_bad_masks_are_rejected():
    model = small_net()
    m = Masker(prunable_parameters(model))
    with pytest.raises(ConfigError, match="unknown parameter"):
        m.set_masks({"nope": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="bool tensor of shape"):
        m.set_masks({"3.weight": torch.zeros(16, 144)})


def test_prunable_parameters_and_ignore():
    model = small_net()
    assert list(prunable_parameters(model)) == ["0.weight", "3.weight", "5.weight"]
    assert list(prunable_parameters(model, ignore=[r"^5\."])) == ["0.weight", "3.weight"]
    with pytest.raises(ConfigError, match="no prunable parameters"):
        prunable_parameters(nn.Sequential(nn.ReLU()))


def test_gpt2_conv1d_weights_are_masked_and_the_head_is_not():
    """Regression: prunable_parameters skipped transformers Conv1D, so training-time pruning of
    GPT-2 masked only the tied lm_head."""
    from conftest import tiny_model

    model = tiny_model("gpt2")
    names = set(prunable_parameters(model))
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert "lm_head.weight" in prunable_parameters(model, include_heads=True)


def test_gpt2_nm_training_masks_follow_the_input_dim():
    import torch

    from conftest import tiny_model
    from prunekit.config import Pattern
    from prunekit.patterns import is_nm
    from prunekit.schedules import Gradual
    from prunekit.training import SparsityController

    model = tiny_model("gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = SparsityController(model, opt, Gradual(target=0.5, start=0, end=1, frequency=1,
                                                  pattern=Pattern.parse("2:4")))
    ids = torch.randint(0, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    ctrl.step()
    for name, p in ctrl.params.items():
        assert is_nm(p.detach().t(), 2, 4), name  # Conv1D stores (in, out): groups of 4 inputs per output
        assert float((p == 0).float().mean()) == 0.5
