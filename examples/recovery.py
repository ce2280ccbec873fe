"""Recovery after one-shot pruning with few trainable parameters, masks kept (PERP,
Zimmer et al. 2023): retrain only biases and norms, or masked LoRA adapters that merge
without losing sparsity. Also shows global magnitude pruning with a per-layer minimum.
The dense network is trained first, so its accuracy is measured there, before pruning.
Run: python examples/recovery.py
"""
import copy

import torch
from torch import nn

from prunekit.datasets import load_fashion_mnist
from prunekit.masking import sparsity_report
from prunekit.schedules import Gradual
from prunekit.training import SparsityController, add_masked_lora, bias_norm_parameters, merge_masked_lora


def fit(model, params, x, y, epochs):
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(epochs):
        for i in torch.randperm(len(y)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 3, n_train: int = 5000, sparsity: float = 0.9) -> dict:
    torch.manual_seed(0)
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.LayerNorm(300), nn.ReLU(), nn.Linear(300, 10))
    fit(dense, dense.parameters(), x, y, epochs)
    results = {"dense": accuracy(dense, xt, yt)}

    pruned = copy.deepcopy(dense)
    opt = torch.optim.SGD(pruned.parameters(), lr=0.0)
    # One-shot: a schedule that prunes once at step 0; global threshold, each layer keeps a minimum.
    ctrl = SparsityController(pruned, opt, Gradual(target=sparsity, start=0, end=0, allocation="global_min"))
    masks = {n: m.clone() for n, m in ctrl.masks.items()}
    ctrl.make_permanent()
    results["one-shot"] = accuracy(pruned, xt, yt)

    bias_norm = copy.deepcopy(pruned)
    fit(bias_norm, bias_norm_parameters(bias_norm), x, y, epochs)
    results["biases+norms retrained"] = accuracy(bias_norm, xt, yt)

    lora = copy.deepcopy(pruned)
    fit(lora, add_masked_lora(lora, masks, rank=8), x, y, epochs)
    merged = merge_masked_lora(lora)
    results["masked LoRA, merged"] = accuracy(merged, xt, yt)
    results["merged sparsity"] = sparsity_report(merged)["__total__"]["sparsity"]
    print(f"dense accuracy {results['dense']:.3f} -> one-shot ({results['merged sparsity']:.0%} sparse) "
          f"{results['one-shot']:.3f} -> biases+norms retrained {results['biases+norms retrained']:.3f}, "
          f"masked LoRA merged {results['masked LoRA, merged']:.3f}  ({len(yt)} test images)")
    return results


if __name__ == "__main__":
    main()
