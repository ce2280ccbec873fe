"""Pruning at initialisation: SNIP, GraSP, SynFlow (data-free), random with ERK; the
layerwise-shuffle control. The mask is chosen before training, then held fixed.
Run: python examples/prune_at_init.py
"""
import torch
from torch import nn

from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import AtInit, prune_at_init
from prunekit.training import SparsityController


def main(epochs: int = 2, n_train: int = 3000, sparsity: float = 0.95,
         methods: tuple = ("snip", "grasp", "synflow", "random")) -> dict:
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    results = {}
    for method in methods:
        for shuffle in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                  nn.Linear(100, 10))
            config = AtInit(method, sparsity, allocation="erk" if method == "random" else None, shuffle=shuffle)
            masks = prune_at_init(model, config, [(x[:256], y[:256])])  # one batch scores the weights
            opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
            ctrl = SparsityController(model, opt, masks=masks)
            for _ in range(epochs):
                for i in torch.randperm(n_train).split(128):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[i]), y[i]).backward()
                    opt.step()
                    ctrl.step()
            with torch.no_grad():
                results[f"{method}{' shuffled' if shuffle else ''}"] = (model(xt).argmax(1) == yt).float().mean().item()
    return results


if __name__ == "__main__":
    print(main())
