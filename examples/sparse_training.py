"""Dynamic sparse training at constant density: SET and RigL with ERK initial densities and a
cosine-decayed update fraction (Mocanu et al. 2018; Evci et al. 2020). The dense baseline is
the same network trained with the same budget (same initialisation, data order and steps)
at full density.
Run: python examples/sparse_training.py
"""
import torch
from torch import nn

from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import DynamicSparse
from prunekit.training import SparsityController


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model, opt, x, y, epochs, ctrl=None) -> None:
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


def main(epochs: int = 3, n_train: int = 5000, sparsity: float = 0.95) -> dict:
    """``{"dense", "static", "set", "rigl"}`` -> ``{"accuracy", "sparsity"}``."""
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    steps = epochs * ((n_train + 127) // 128)
    dense = net()
    train(dense, torch.optim.Adam(dense.parameters(), lr=1.2e-3), x, y, epochs)
    results = {"dense": {"accuracy": accuracy(dense, xt, yt), "sparsity": 0.0}}
    print(f"dense: same init, data and {steps} steps at full density; {len(yt)} test images")
    for method in ("static", "set", "rigl"):
        model = net()
        opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
        schedule = DynamicSparse(method, sparsity, update_every=20, alpha=0.3, end=int(0.75 * steps), allocation="erk")
        ctrl = SparsityController(model, opt, schedule)  # RigL's dense gradients are captured automatically
        train(model, opt, x, y, epochs, ctrl)
        results[method] = {"accuracy": accuracy(model, xt, yt), "sparsity": ctrl.sparsity()}
        print(f"dense accuracy {results['dense']['accuracy']:.3f} -> {method} ({results[method]['sparsity']:.0%} sparse) "
              f"{results[method]['accuracy']:.3f}")
    return results


if __name__ == "__main__":
    main()
