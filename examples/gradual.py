"""Gradual magnitude pruning (Zhu & Gupta 2017) inside a plain PyTorch training loop.

A small MLP on Fashion-MNIST goes from dense to 90% sparse over the first 60% of training
on the cubic schedule; the pruned weights stay exactly zero under Adam. Pruning starts at
initialisation, so the dense baseline is the same network trained with the same budget
(same initialisation, data order and number of steps) without pruning.
Run: python examples/gradual.py   (needs `apt-get install dataset-fashion-mnist`)
"""
import torch
from torch import nn

from prunekit.config import Pattern
from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import Gradual
from prunekit.training import SparsityController


def net() -> nn.Module:
    torch.manual_seed(0)  # the same initialisation and data order for the dense and the pruned run
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model, opt, x, y, epochs, ctrl=None) -> None:
    for _ in range(epochs):
        for i in torch.randperm(len(y)).split(128):
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if ctrl is not None:
                ctrl.step()  # advance the schedule once per optimizer step


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 3, n_train: int = 5000, target: float = 0.9, pattern: str = "unstructured") -> dict:
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    steps = epochs * ((n_train + 127) // 128)

    dense = net()
    train(dense, torch.optim.Adam(dense.parameters(), lr=1.2e-3), x, y, epochs)
    dense_acc = accuracy(dense, xt, yt)

    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    schedule = Gradual(target=target, start=0, end=int(0.6 * steps), frequency=10, pattern=Pattern.parse(pattern))
    ctrl = SparsityController(model, opt, schedule)  # attach after building the optimizer
    train(model, opt, x, y, epochs, ctrl)
    ctrl.make_permanent()  # remove the hooks; zeros stay
    sparsity = ctrl.report()["__total__"]["sparsity"]
    acc = accuracy(model, xt, yt)
    shape = "" if pattern == "unstructured" else f", {pattern}"
    print(f"dense accuracy {dense_acc:.3f} -> pruned ({sparsity:.0%} sparse{shape}) {acc:.3f}  "
          f"(dense: same init, data and {steps} steps without pruning; {len(yt)} test images)")
    return {"sparsity": sparsity, "accuracy": acc, "dense accuracy": dense_acc}


if __name__ == "__main__":
    main()
    main(target=0.5, pattern="2:4")
