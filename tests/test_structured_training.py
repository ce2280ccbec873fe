"""Training-time structured masks from the structural graph: whole coupled units are masked
during training, then removed physically with no change to the model's outputs."""
import copy

import torch
from torch import nn

from prunekit.models.zoo import ZOO, example_input
from prunekit.schedules import Gradual, Iterative, LotteryTicket
from prunekit.structural import build_graph, remove_masked_units
from prunekit.training import SparsityController


def test_gradual_unit_masks_then_exact_removal():
    torch.manual_seed(0)
    model = ZOO["resnet"]()
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    graph = build_graph(model.eval(), example_input("resnet"))
    groups = graph.of_kind("channels")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ctrl = SparsityController(model, opt, Gradual(target=0.5, start=0, end=6, frequency=2, channels=True),
                              units=groups)
    model.train()
    for _ in range(8):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ctrl.step()
    model.eval()
    masks = {n: m.clone() for n, m in ctrl.masks.items()}
    ctrl.make_permanent()
    with torch.no_grad():
        before = model(x)
    n_before = sum(p.numel() for p in model.parameters())
    remove_masked_units(model, groups, masks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < 0.45 * n_before


def test_lottery_ticket_unit_masks_are_whole_units():
    torch.manual_seed(0)
    model = ZOO["smallcnn"]().eval()
    groups = build_graph(model, example_input("smallcnn")).of_kind("channels")
    ticket = LotteryTicket(model, Iterative(rounds=2, rate=0.25, channels=True), units=groups)
    masks = ticket.prune_and_rewind()
    for g in groups:
        states = []
        for unit in g.units:
            inside = [m for m in unit if m.param in masks]
            flags = {bool(masks[m.param].index_select(m.dim, torch.tensor(m.index)).all()) for m in inside}
            assert len(flags) == 1  # a unit is masked in all its weights or in none
            states.append(flags.pop())
        assert sum(states) == int(0.25 * len(g.units))
    before = copy.deepcopy(model)
    remove_masked_units(model, groups, masks)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in before.parameters())
