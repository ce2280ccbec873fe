"""Dynamic sparse training at constant density: SET and RigL with ERK initial densities and a
cosine-decayed update fraction (Mocanu et al. 2018; Evci et al. 2020).
Run: python examples/sparse_training.py
"""
import torch
from torch import nn

from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import DynamicSparse
from prunekit.training import SparsityController


def main(epochs: int = 3, n_train: int = 5000, sparsity: float = 0.95) -> dict:
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    steps = epochs * ((n_train + 127) // 128)
    results = {}
    for method in ("static", "set", "rigl"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                              nn.Linear(100, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
        schedule = DynamicSparse(method, sparsity, update_every=20, alpha=0.3, end=int(0.75 * steps), allocation="erk")
        ctrl = SparsityController(model, opt, schedule)  # RigL's dense gradients are captured automatically
        for _ in range(epochs):
            for i in torch.randperm(n_train).split(128):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
                ctrl.step()
        with torch.no_grad():
            results[method] = {"accuracy": (model(xt).argmax(1) == yt).float().mean().item(),
                               "sparsity": ctrl.sparsity()}
    return results


if __name__ == "__main__":
    print(main())
