"""Every schedule's sparsity trajectory against its formula, N:M validity, bad input, resume."""
import math

import pytest
import torch
from torch import nn

from prunekit.config import Pattern
from prunekit.errors import ConfigError, DataError, ScheduleError
from prunekit.masking import prunable_parameters
from prunekit.patterns import is_nm
from prunekit.schedules import INIT_SCORES, AtInit, DynamicSparse, Gradual, Iterative, LotteryTicket, prune_at_init
from prunekit.schedules.regrow import swap_nm, swap_unstructured
from prunekit.training import SparsityController


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


def run(model, opt, ctrl, steps, seed=1, on_step=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        y = torch.randint(0, 8, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctrl.step()
        if on_step:
            on_step(ctrl)


def counts(masks):
    return sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """The paper's formula, written independently of the implementation."""
    if t < t0:
        return 0.0
    k = min((t - t0) // dt, n)
    return s_f + (s_i - s_f) * (1 - k * dt / (n * dt)) ** 3


def test_gradual_trajectory_matches_zhu_gupta():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = Gradual(target=0.9, start=5, end=45, frequency=10, initial=0.1)
    ctrl = SparsityController(model, opt, sched)
    seen = []
    run(model, opt, ctrl, 60, on_step=lambda c: seen.append((c.step_count, counts(c.masks))))
    for step, (pruned, total) in seen:
        expected = zhu_gupta(step, 0.1, 0.9, 5, 4, 10)
        # Uniform allocation rounds per layer: within one weight per layer of the formula.
        assert abs(pruned - expected * total) <= 3, (step, pruned / total, expected)
    assert seen[3][1][0] == 0 and seen[4][1][0] > 0  # nothing before t0 = 5
    assert [s for s, _ in seen if sched.is_event(s)] == [5, 15, 25, 35, 45]


def test_gradual_nm_steps_down_the_grid_and_ends_nm():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = Gradual(target=0.75, start=0, end=30, frequency=10, pattern=Pattern.parse("1:4"))
    ctrl = SparsityController(model, opt, sched)
    traj = {}
    run(model, opt, ctrl, 35, on_step=lambda c: traj.setdefault(c.step_count, counts(c.masks)))
    for step, (pruned, total) in traj.items():
        expected = math.floor(zhu_gupta(step, 0.0, 0.75, 0, 3, 10) * 4 + 1e-9) / 4
        assert pruned / total == pytest.approx(expected), step
    for n, p in prunable_parameters(model).items():
        assert is_nm(p.detach(), 1, 4)


def test_gradual_global_min_keeps_every_layer():
    def tiny_last_layer():
        model = mlp()
        with torch.no_grad():
            model[4].weight.mul_(1e-3)  # global magnitude alone would empty this layer
        return model, torch.optim.SGD(model.parameters(), lr=0.0)

    model, opt = tiny_last_layer()
    ctrl = SparsityController(model, opt, Gradual(target=0.9, start=0, end=0, allocation="global_min"))
    floor = 0.25 * 0.1 * model[4].weight.numel()
    assert int((~ctrl.masks["4.weight"]).sum()) == math.ceil(floor)
    ctrl_g = SparsityController(*tiny_last_layer(), Gradual(target=0.9, start=0, end=0, allocation="global"))
    assert int((~ctrl_g.masks["4.weight"]).sum()) == 0
    assert counts(ctrl.masks)[0] == round(0.9 * counts(ctrl.masks)[1])


def test_gradual_channels_prunes_whole_rows_by_l2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        model[0].weight[[1, 5]] *= 0.01  # the two weakest channels by L2 norm
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = Gradual(target=0.5, start=0, end=4, frequency=2, channels=True)
    ctrl = SparsityController(model, opt, sched)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        x = torch.randn(4, 3, 6, 6, generator=g)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        ctrl.step()
        for name, p in prunable_parameters(model).items():
            rows = (p.detach().reshape(p.shape[0], -1) == 0).all(dim=1)  # whole output channels
            assert int(rows.sum()) == round(sched.sparsity_at(step) * p.shape[0]), (step, name)
            assert int((p == 0).sum()) == int(rows.sum()) * p[0].numel()
    conv_rows = (model[0].weight.detach().reshape(8, -1) == 0).all(dim=1)
    assert conv_rows[1] and conv_rows[5]
    from prunekit.schedules.base import select_masks

    with pytest.raises(ScheduleError, match="exclude each other"):
        select_masks({"w": torch.rand(4, 4)}, 0.5, pattern=Pattern.parse("2:4"), channels=True)


@pytest.mark.parametrize("kw, match", [
    (dict(target=0.9, start=10, end=5), "precedes its start"),
    (dict(target=1.0), r"outside \[0, 1\)"),
    (dict(target=-0.1), r"outside \[0, 1\)"),
    (dict(target=0.9, frequency=0), "frequency"),
    (dict(target=0.5, initial=0.6), "exceeds the target"),
    (dict(target=0.6, pattern=Pattern.parse("2:4")), "set target=0.5"),
])
def test_gradual_bad_input(kw, match):
    with pytest.raises(ScheduleError, match=match):
        Gradual(**kw)


def test_bad_input_other_schedules():
    with pytest.raises(ScheduleError, match=r"outside \[0, 1\)"):
        DynamicSparse("rigl", 1.2)
    with pytest.raises(ScheduleError, match="'static', 'set' or 'rigl'"):
        DynamicSparse("foo", 0.9)
    with pytest.raises(ScheduleError, match="rate"):
        Iterative(rate=1.0)
    with pytest.raises(ScheduleError, match=r"outside \[0, 1\)"):
        AtInit("snip", 1.0)
    with pytest.raises(DataError, match="needs at least one"):
        prune_at_init(mlp(), AtInit("snip", 0.5))
    with pytest.raises(ConfigError, match="unknown score at initialisation 'snipp'"):
        AtInit("snipp", 0.5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_iterative_rounds_follow_geometric_sparsity_and_rewind(pattern):
    model = mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rate = 0.5 if pattern == "unstructured" else 0.3
    cfg = Iterative(rounds=3, rate=rate, pattern=Pattern.parse(pattern))
    ticket = LotteryTicket(model, cfg)
    for r in range(1, cfg.rounds + 1):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ctrl = SparsityController(model, opt, masks=ticket.masks)
        run(model, opt, ctrl, 5, seed=r, on_step=lambda c: ticket.observe(c.step_count))
        ctrl.make_permanent()
        previous = {n: m.clone() for n, m in ticket.masks.items()}
        masks = ticket.prune_and_rewind()
        pruned, total = counts(masks)
        # 2:4 at 30% per round: 0.3 -> 0.25 on the 1/4 grid, 0.51 -> 0.5, then held at N:M
        expected = 1 - 0.5**r if pattern == "unstructured" else (0.25 if r == 1 else 0.5)
        assert pruned / total == pytest.approx(expected, abs=1e-3)
        assert all((masks[n] | ~previous[n]).all() for n in masks)  # pruned weights stay pruned
        state = model.state_dict()
        for k, v in init.items():
            kept = ~masks[k] if k in masks else torch.ones_like(v, dtype=torch.bool)
            assert torch.equal(state[k][kept], v[kept])  # survivors rewound to initialisation
            if k in masks:
                assert (state[k][masks[k]] == 0).all()


def test_iterative_rewinds_to_step_k():
    model = mlp()
    ticket = LotteryTicket(model, Iterative(rounds=1, rewind_step=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = SparsityController(model, opt)
    snap = {}
    run(model, opt, ctrl, 6, on_step=lambda c: (ticket.observe(c.step_count),
                                                c.step_count == 3 and snap.update({k: v.clone() for k, v in model.state_dict().items()})))
    masks = ticket.prune_and_rewind()
    for k, v in model.state_dict().items():
        kept = ~masks[k] if k in masks else torch.ones_like(v, dtype=torch.bool)
        assert torch.equal(v[kept], snap[k][kept])
    with pytest.raises(ScheduleError, match="no rewind point"):
        LotteryTicket(mlp(), Iterative(rewind_step=100)).prune_and_rewind()


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_dynamic_sparse_keeps_density_and_swaps_the_cosine_fraction(method, pattern):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = 0.5 if pattern == "2:4" else 0.8
    sched = DynamicSparse(method, sp, update_every=4, alpha=0.4, end=20, pattern=Pattern.parse(pattern))
    ctrl = SparsityController(model, opt, sched)
    start = counts(ctrl.masks)
    params = prunable_parameters(model)
    changed = {}

    def record(c):
        changed[c.step_count] = sum(int((c.masks[n] != prev[n]).sum()) for n in prev)
        prev.update({n: m.clone() for n, m in c.masks.items()})
        assert counts(c.masks) == start
        for n, p in params.items():
            assert (p[c.masks[n]] == 0).all()
            if pattern == "2:4":
                assert is_nm(p.detach(), 2, 4)

    prev = {n: m.clone() for n, m in ctrl.masks.items()}
    run(model, opt, ctrl, 24, on_step=record)
    assert all(changed[s] == 0 for s in changed if not sched.is_update(s))
    for s in (4, 8, 12, 16):
        frac = 0.2 * (1 + math.cos(math.pi * s / 20))
        active = start[1] - start[0]
        # A swap changes two positions, unless a just-dropped weight is regrown (allowed, as in
        # RigL's code); exact counts are checked on hand-built tensors below.
        assert frac * active - 3 <= changed[s] <= 2 * frac * active + 1e-6


def test_swap_drops_exactly_the_fraction_and_regrows_the_best():
    mag = torch.arange(100.0).view(1, 100)
    pruned = torch.arange(100).view(1, 100) < 10  # 0..9 pruned, 90 active
    grow = -torch.arange(100.0).view(1, 100)  # lower index = better
    new = swap_unstructured(mag, grow, pruned, 0.3)  # k = 27: drop 10..36, regrow 0..26
    assert new.view(-1).nonzero().view(-1).tolist() == list(range(27, 37))


def test_rigl_regrows_where_the_gradient_is_largest():
    mag = torch.tensor([[5.0, 0.1, 3.0, 0.0]])
    pruned = torch.tensor([[False, False, False, True]])
    grow = torch.tensor([[0.0, 0.0, 0.0, 9.0]])
    new = swap_unstructured(mag, grow, pruned, 0.34)  # k = 1: drop the 0.1, grow position 3
    assert new.tolist() == [[False, True, False, False]]
    nm_new = swap_nm(torch.tensor([[5.0, 0.1, 3.0, 0.2]]), grow, torch.tensor([[False, False, True, True]]), 0.5, 4)
    assert nm_new.tolist() == [[False, True, True, False]]


def test_erk_initial_masks_are_denser_for_small_layers():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = SparsityController(model, opt, DynamicSparse("set", 0.9, allocation="erk"))
    dens = {n: 1 - m.float().mean().item() for n, m in ctrl.masks.items()}
    assert dens["4.weight"] > dens["2.weight"] > dens["0.weight"] * 0.99
    assert counts(ctrl.masks)[0] == pytest.approx(0.9 * counts(ctrl.masks)[1], abs=3)


@pytest.mark.parametrize("schedule", [
    lambda: Gradual(target=0.8, start=2, end=30, frequency=4),
    lambda: DynamicSparse("set", 0.8, update_every=3, end=40),
    lambda: DynamicSparse("rigl", 0.8, update_every=3, end=40),
], ids=["gradual", "set", "rigl"])
def test_resume_from_checkpoint_reproduces_masks(schedule, tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = SparsityController(model, opt, schedule(), seed=7)
    run(model, opt, ctrl, 10)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": ctrl.state_dict()}, path)
    run(model, opt, ctrl, 20, seed=2)
    reference = {n: m.clone() for n, m in ctrl.masks.items()}

    model2 = mlp(seed=123)  # different weights until the checkpoint is loaded
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    ctrl2 = SparsityController(model2, opt2, schedule(), seed=99)
    ckpt = torch.load(path)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    ctrl2.load_state_dict(ckpt["sparsity"])
    assert ctrl2.step_count == 10
    run(model2, opt2, ctrl2, 20, seed=2)
    assert all(torch.equal(reference[n], ctrl2.masks[n]) for n in reference)
    assert any(ctrl.masks[n].any() for n in reference)


@pytest.mark.parametrize("method", INIT_SCORES.names())
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_at_init_exact_sparsity(method, pattern):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 32, generator=g), torch.randint(0, 8, (32,), generator=g))]
    sp = 0.5 if pattern == "2:4" else 0.9
    masks = prune_at_init(model, AtInit(method, sp, pattern=Pattern.parse(pattern), iterations=10), batches)
    pruned, total = counts(masks)
    assert pruned == pytest.approx(sp * total, abs=3)
    params = prunable_parameters(model)
    assert list(masks) == list(params)
    assert all(masks[n].dtype == torch.bool and masks[n].shape == p.shape for n, p in params.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    if pattern == "2:4":
        for m in masks.values():
            assert is_nm((~m).float(), 2, 4)
    again = prune_at_init(model, AtInit(method, sp, pattern=Pattern.parse(pattern), iterations=10), batches)
    assert all(torch.equal(masks[n], again[n]) for n in masks)  # deterministic under the seed
    shuffled = prune_at_init(model, AtInit(method, sp, shuffle=True, iterations=10), batches) if pattern == "unstructured" else None
    if shuffled is not None:
        ref = prune_at_init(model, AtInit(method, sp, iterations=10), batches)
        for n in ref:
            assert int(shuffled[n].sum()) == int(ref[n].sum())
            if 0 < int(ref[n].sum()) < ref[n].numel():  # a full or empty layer shuffles to itself
                assert not torch.equal(shuffled[n], ref[n])


def test_snip_scores_hand_computed():
    # One linear layer, loss = sum(output): dL/dW = outer(1, x), SNIP = |W * x|.
    from prunekit.schedules.at_init import INIT_SCORES
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]]))
    x = torch.tensor([[1.0, 2.0, -1.0]])
    from prunekit.calibration import CalibrationData
    scores = INIT_SCORES.get("snip").fn(lin, {"weight": lin.weight}, CalibrationData.from_inputs(x),
                                        lambda out, y: out.sum(), torch.Generator())
    assert torch.equal(scores["weight"], torch.tensor([[1.0, 4.0, 3.0], [0.5, 0.0, 1.0]]))


def test_synflow_is_iterative_with_exponential_schedule():
    cfg = AtInit("synflow", 0.99, iterations=4)
    assert [round(cfg.sparsity_at_iteration(k), 6) for k in (1, 2, 4)] == [
        round(1 - 0.01 ** 0.25, 6), round(1 - 0.01 ** 0.5, 6), 0.99]


def test_rigl_grows_by_the_dense_gradient_of_the_update_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctrl = SparsityController(model, opt, DynamicSparse("rigl", 0.8, update_every=3, alpha=0.3, end=100))
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g)
        if step == 3:  # reference: the dense gradient at the same weights, computed without hooks
            fresh = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
            loss = nn.functional.cross_entropy(torch.func.functional_call(model, fresh, (x,)), y)
            ref = dict(zip(fresh, torch.autograd.grad(loss, list(fresh.values()))))
            before = {n: m.clone() for n, m in ctrl.masks.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctrl.step()
    for n, m in ctrl.masks.items():
        grown = before[n] & ~m
        assert int(grown.sum()) > 0
        assert float(ref[n].abs()[grown].min()) >= float(ref[n].abs()[m].max())


@pytest.mark.parametrize("score", ["wanda", "taylor", "random", "magnitude"])
def test_gradual_takes_any_element_score(score):
    """Gradual pruning with an activation- or gradient-aware score: the masks equal the element
    score computed by hand from the inputs (or gradients) of the steps before the event."""
    from prunekit.schedules import Gradual
    from prunekit.scoring import SCORES, LayerStats
    from prunekit.training import SparsityController

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: the scores are reproducible
    ctrl = SparsityController(model, opt, Gradual(target=0.5, start=2, end=2, frequency=1, score=score))
    xs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    seen, grads = {}, {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0]))
             for n, m in (("0.weight", model[0]), ("2.weight", model[2]))]
    for x in xs:
        model(x).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("weight")}
        opt.step()
        opt.zero_grad()
        ctrl.step()
    for h in hooks:
        h.remove()
    for name, p in ctrl.params.items():
        norm = torch.cat(seen[name]).norm(dim=0)  # (in,): every input since the last (first) event
        stats = LayerStats(input_norm=norm, generator=None, grad=grads[name])
        if score == "random":
            assert int(ctrl.masks[name].sum()) == p.numel() // 2
            continue
        s = SCORES.get(score)(p.detach(), stats)
        expected = s <= s.flatten().kthvalue(p.numel() // 2).values
        assert torch.equal(ctrl.masks[name], expected), name


def test_training_scores_that_need_a_hessian_are_refused():
    from prunekit.errors import ScheduleError
    from prunekit.schedules import Gradual

    with pytest.raises(ScheduleError, match="needs the layer Hessian"):
        Gradual(target=0.5, score="obs")
