"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
Frankle et al. 2020 for rewinding to step k), and the random-reinit control.
Round 0 trains the dense network: its accuracy is the dense baseline of every later round.
Run: python examples/lottery_ticket.py
"""
import torch
from torch import nn

from prunekit.datasets import load_fashion_mnist
from prunekit.schedules import Iterative, LotteryTicket, reinitialize
from prunekit.training import SparsityController


def train(model, masks, x, y, epochs, on_step=None):
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    ctrl = SparsityController(model, opt, masks=masks)
    step = 0
    for _ in range(epochs):
        for i in torch.randperm(len(y)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            ctrl.step()
            step += 1
            if on_step:
                on_step(step)
    ctrl.make_permanent()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(rounds: int = 3, epochs: int = 2, n_train: int = 3000, rewind_step: int = 20) -> list[dict]:
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", 1000)

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    model = net(0)
    ticket = LotteryTicket(model, Iterative(rounds=rounds, rate=0.5, rewind_step=rewind_step))
    results = []
    dense = None
    for r in range(rounds + 1):
        train(model, ticket.masks, x, y, epochs, on_step=ticket.observe)  # observe keeps the step-k weights
        row = {"round": r, "ticket": accuracy(model, xt, yt)}
        if r > 0:  # control: same mask, fresh random initialisation
            control = net(0)
            reinitialize(control, seed=123)
            train(control, ticket.masks, x, y, epochs)
            row["random_reinit"] = accuracy(control, xt, yt)
        row["sparsity"] = sum(int(m.sum()) for m in ticket.masks.values()) / sum(m.numel() for m in ticket.masks.values())
        if r == 0:  # no mask yet: this round trained the dense network
            dense = row["ticket"]
            print(f"round 0: dense accuracy {dense:.3f} ({epochs} epochs, {len(yt)} test images)")
        else:
            print(f"round {r}: dense accuracy {dense:.3f} -> ticket ({row['sparsity']:.0%} sparse) {row['ticket']:.3f}, "
                  f"random reinit {row['random_reinit']:.3f}")
        row["dense"] = dense
        results.append(row)
        if r < rounds:
            ticket.prune_and_rewind()  # prune 50% of survivors, rewind to step k
    return results


if __name__ == "__main__":
    main()
