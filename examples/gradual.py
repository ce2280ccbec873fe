"""Gradual magnitude pruning (Zhu & Gupta 2017) inside a plain PyTorch training loop.

A small MLP on Fashion-MNIST goes from dense to 90% sparse over the first 60% of training
on the cubic schedule; the pruned weights stay exactly zero under Adam.
Run: python examples/gradual.py   (needs `apt-get install dataset-fashion-mnist`)
"""
import torch
from torch import nn

from prunekit.config import Pattern
from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import Gradual
from prunekit.training import SparsityController


def main(epochs: int = 3, n_train: int = 5000, target: float = 0.9, pattern: str = "unstructured") -> dict:
    torch.manual_seed(0)
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    steps = epochs * ((n_train + 127) // 128)
    schedule = Gradual(target=target, start=0, end=int(0.6 * steps), frequency=10, pattern=Pattern.parse(pattern))
    ctrl = SparsityController(model, opt, schedule)  # attach after building the optimizer
    for _ in range(epochs):
        for i in torch.randperm(n_train).split(128):
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctrl.step()  # advance the schedule once per optimizer step
    ctrl.make_permanent()  # remove the hooks; zeros stay
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return {"sparsity": ctrl.report()["__total__"]["sparsity"], "accuracy": acc}


if __name__ == "__main__":
    print(main())
    print("2:4:", main(target=0.5, pattern="2:4"))
