"""The model zoo: output shapes, determinism under a seed, one SGD step lowers the loss,
and forwards that survive removed heads (no hard-coded sizes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ConfigError
from prunekit.models.zoo import ZOO, BertLike, SmallCNN, ViT, example_input

SHAPES = {
    "resnet": (4, 10), "mobilenet": (4, 10), "unet": (4, 1, 28, 28), "smallcnn": (4, 10),
    "vit": (4, 10), "bert": (4, 16, 64),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name]()


def loss_fn(name: str, out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if out.dim() == 2:  # logits (B, classes)
        return F.cross_entropy(out, torch.randint(0, out.shape[1], (out.shape[0],), generator=g))
    return F.mse_loss(out, torch.randn(out.shape, generator=g))


def test_registry_covers_shapes():
    assert set(ZOO) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_forward_shape_and_determinism(name):
    x = example_input(name, batch=4)
    assert torch.equal(x, example_input(name, batch=4))
    a, b = build(name).eval(), build(name).eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert tuple(ya.shape) == SHAPES[name]
    assert torch.isfinite(ya).all()
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(build(name, seed=1).eval()(x), ya)  # the seed matters


@pytest.mark.parametrize("name", sorted(ZOO))
def test_one_sgd_step_lowers_loss(name):
    model = build(name).train()
    x = example_input(name, batch=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = loss_fn(name, model(x))
    opt.zero_grad()
    before.backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part in the forward"
    opt.step()
    with torch.no_grad():
        after = loss_fn(name, model(x))
    assert after.item() < before.item() - 1e-4


def test_smallcnn_size():
    n = sum(p.numel() for p in SmallCNN().parameters())
    assert 100_000 <= n <= 150_000


def test_bert_padding_mask_hides_padding():
    model = build("bert").eval()
    ids = example_input("bert", batch=2)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    other = ids.clone()
    other[:, 12:] = (other[:, 12:] + 7) % 1000  # change only the padded tokens
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
    torch.testing.assert_close(a[:, :12], b[:, :12])


def _drop_heads(attn: nn.Module, keep: list[int]) -> None:
    """Remove heads by hand, as structural pruning will: q/k/v rows and o columns."""
    hd = attn.head_dim
    idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep])
    for name in ("q", "k", "v"):
        lin = getattr(attn, name)
        new = nn.Linear(lin.in_features, len(idx))
        new.weight.data, new.bias.data = lin.weight.data[idx].clone(), lin.bias.data[idx].clone()
        setattr(attn, name, new)
    o = attn.o
    new = nn.Linear(len(idx), o.out_features)
    new.weight.data, new.bias.data = o.weight.data[:, idx].clone(), o.bias.data.clone()
    attn.o = new


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_forward_runs_with_fewer_heads(name):
    model = build(name).eval()
    for block in model.blocks:
        _drop_heads(block.attn, keep=[0, 2])
    out = model(example_input(name))
    assert tuple(out.shape[1:]) == SHAPES[name][1:]


def test_smallcnn_runs_with_fewer_channels():
    model = SmallCNN(width=8).eval()
    conv = model.features[-4]  # the last conv (16 -> 16); its BN at [-3] is replaced below
    keep = torch.arange(0, 16, 2)
    new_conv = nn.Conv2d(conv.in_channels, len(keep), 3, padding=1, bias=False)
    new_conv.weight.data = conv.weight.data[keep].clone()
    new_bn = nn.BatchNorm2d(len(keep)).eval()
    model.features[-4], model.features[-3] = new_conv, new_bn
    cols = torch.cat([torch.arange(c * 9, (c + 1) * 9) for c in keep])  # flatten: channel c -> 9 features
    fc1 = nn.Linear(len(cols), model.fc1.out_features)
    fc1.weight.data = model.fc1.weight.data[:, cols].clone()
    model.fc1 = fc1
    assert model(example_input("smallcnn")).shape == (2, 10)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="heads"):
        BertLike(dim=64, heads=5)
    with pytest.raises(ConfigError, match="patch"):
        ViT(image_size=28, patch=5)
    with pytest.raises(ConfigError, match="unknown zoo model"):
        example_input("alexnet")
