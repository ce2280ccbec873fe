"""Pruning at initialisation: SNIP, GraSP, SynFlow (data-free), random with ERK; the
layerwise-shuffle control. The mask is chosen before training, then held fixed. The dense
baseline is the same network trained with the same budget (same initialisation, epochs and
optimizer) without a mask.
Run: python examples/prune_at_init.py
"""
import torch
from torch import nn

from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import AtInit, prune_at_init
from prunekit.training import SparsityController


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model, x, y, epochs, masks=None) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    ctrl = SparsityController(model, opt, masks=masks) if masks is not None else None
    for _ in range(epochs):
        for i in torch.randperm(len(y)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            if ctrl is not None:
                ctrl.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 2, n_train: int = 3000, sparsity: float = 0.95,
         methods: tuple = ("snip", "grasp", "synflow", "random")) -> dict:
    """Test accuracy per method (and ``"<method> shuffled"``), plus ``"dense"``: the unpruned
    network trained the same way."""
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    dense = net()
    train(dense, x, y, epochs)
    results = {"dense": accuracy(dense, xt, yt)}
    print(f"dense: same init and {epochs} epochs without a mask; {len(yt)} test images")
    for method in methods:
        for shuffle in (False, True):
            model = net()
            config = AtInit(method, sparsity, allocation="erk" if method == "random" else None, shuffle=shuffle)
            masks = prune_at_init(model, config, [(x[:256], y[:256])])  # one batch scores the weights
            train(model, x, y, epochs, masks)
            name = f"{method}{' shuffled' if shuffle else ''}"
            results[name] = accuracy(model, xt, yt)
            print(f"dense accuracy {results['dense']:.3f} -> {name} ({sparsity:.0%} sparse) {results[name]:.3f}")
    return results


if __name__ == "__main__":
    main()
