"""Distillation recovery: the loss terms against naive formulas, a pruned model moving toward
its teacher, masks kept, full / masked LoRA / peft, resuming bit for bit, and the recipe."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.stages import RecoveryStage, run_recovery
from prunekit.training.distill import CHECKPOINT_FILE, Distillation, hidden_loss, kl_loss, layer_map

from test_budget import byte_windows, llama


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """sum_v p log(p / q) per token, averaged, times t^2, in float64 with explicit softmaxes."""
    total, n = 0.0, 0
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]).double(),
                            teacher.reshape(-1, teacher.shape[-1]).double()):
        p = torch.exp(t_row / t) / torch.exp(t_row / t).sum()
        q = torch.exp(s_row / t) / torch.exp(s_row / t).sum()
        total += float((p * torch.log(p / q)).sum())
        n += 1
    return total / n * t * t


def test_kl_matches_the_naive_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    for temp in (1.0, 2.0):
        assert float(kl_loss(s, t, temp)) == pytest.approx(naive_kl(s, t, temp), rel=1e-5)
    assert float(kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_layer_map_and_hidden_loss_by_hand():
    assert layer_map(2, 4) == [0, 2, 4]
    assert layer_map(3, 3) == [0, 1, 2, 3]
    assert layer_map(2, 3) == [0, 2, 3]  # round(1.5) = 2 (banker's), ends aligned
    with pytest.raises(ConfigError, match="at least as many layers"):
        layer_map(4, 2)
    ht = tuple(torch.full((1, 2, 3), float(i + 1)) for i in range(5))  # teacher: 4 blocks
    hs = (ht[0], ht[2] + 1.0, ht[4])  # student: 2 blocks matched to teacher 0, 2, 4
    # layer 1: mean((4 - 3)^2) / mean(3^2) = 1/9; layers 0 and 2: 0
    assert float(hidden_loss(hs, ht)) == pytest.approx((1 / 9) / 3)
    with pytest.raises(ConfigError, match="hidden: 0"):
        hidden_loss((torch.zeros(1, 2, 4),) * 2, (torch.zeros(1, 2, 3),) * 2)


def test_distillation_config_errors():
    with pytest.raises(ConfigError, match="every loss weight at 0"):
        Distillation(kl=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        Distillation(temperature=0)
    with pytest.raises(ConfigError, match="unknown distill keys"):
        RecoveryStage("full", distill={"kll": 1.0})
    with pytest.raises(ConfigError, match="unknown method"):
        RecoveryStage("everything")
    assert RecoveryStage("full", distill=True).distill == Distillation()


def _data(n: int = 8, seqlen: int = 32, offset: int = 0):
    from prunekit.calibration import CalibrationData

    return CalibrationData.from_ids(byte_windows(n, seqlen, offset), batch_size=4)


def _pruned_pair(seed: int = 0):
    """A tiny Llama briefly trained on the text (so there is something to distil), and a copy
    with 3/4 of its neurons removed."""
    from prunekit.structural import StructureConfig
    from prunekit.structural.prune import prune_structure

    teacher = llama(layers=2, seed=seed)
    data = _data(16, 32, offset=50_000)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(10):
        for b in data.batches:
            data.loss(teacher, b).backward()
            opt.step()
            opt.zero_grad()
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(False)
    prune_structure(student, StructureConfig("neurons", 0.75, "flap"), data=_data())
    return teacher, student


def _kl_on(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(kl_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def test_full_distillation_moves_the_student_toward_the_teacher():
    teacher, student = _pruned_pair()
    held = byte_windows(4, 32, offset=200_000)
    before = _kl_on(student, teacher, held)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    report = run_recovery(RecoveryStage("full", steps=12, lr=1e-3, distill={"kl": 1.0, "lm": 0.01}),
                          student, _data(), progress=False, teacher=teacher)
    after = _kl_on(student, teacher, held)
    assert after < 0.8 * before, (before, after)
    curve = report["loss_curve"]
    assert curve["step"] == list(range(1, 13)) and len(curve["kl"]) == len(curve["lm"]) == 12
    assert curve["loss"][0] == pytest.approx(curve["kl"][0] + 0.01 * curve["lm"][0], rel=1e-4)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags  # as they were


@pytest.mark.parametrize("method", ["full", "lora", "peft"])
def test_zeros_stay_zeros(method):
    if method == "peft":
        pytest.importorskip("peft")
    teacher, student = _pruned_pair()
    with torch.no_grad():  # 50% unstructured zeros in every projection (the weights pruned before recovery)
        for name, p in student.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.arange(p.numel()).view_as(p) % 2).to(p.dtype))
    zeros = {n: (p == 0).clone() for n, p in student.named_parameters() if n.endswith("proj.weight")}
    before = copy.deepcopy(student.state_dict())
    run_recovery(RecoveryStage(method, steps=3, lr=1e-2, rank=2, distill={"kl": 1.0, "hidden": 0.5}), student,
                 _data(), progress=False, teacher=teacher)
    after = dict(student.named_parameters())
    assert set(after) == {n for n, _ in _pruned_pair()[1].named_parameters()}  # adapters merged away
    for name, mask in zeros.items():
        assert torch.equal(after[name] == 0, mask), name  # exactly the same zeros
    changed = [n for n in zeros if not torch.equal(after[n], before[n])]
    assert changed, "recovery trained nothing"


def test_resume_continues_bit_for_bit(tmp_path):
    teacher, student = _pruned_pair()
    twin = copy.deepcopy(student)
    stage = dict(method="full", lr=2e-3, distill={"kl": 1.0}, checkpoint_every=2)
    full = run_recovery(RecoveryStage(steps=4, checkpoint=str(tmp_path / "a"), **stage), student, _data(),
                        progress=False, teacher=teacher)
    # an interrupted run: 2 steps, then the same run again to 4 steps from its checkpoint
    run_recovery(RecoveryStage(steps=2, checkpoint=str(tmp_path / "b"), **stage), copy.deepcopy(twin), _data(),
                 progress=False, teacher=teacher)
    assert (tmp_path / "b" / CHECKPOINT_FILE).exists()
    resumed = run_recovery(RecoveryStage(steps=4, checkpoint=str(tmp_path / "b"), **stage), twin, _data(),
                           progress=False, teacher=teacher)
    assert resumed["resumed_from_step"] == 2
    assert resumed["loss_curve"] == full["loss_curve"]
    a, b = student.state_dict(), twin.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_run_or_corrupt_is_refused(tmp_path):
    teacher, student = _pruned_pair()
    run_recovery(RecoveryStage("full", steps=1, lr=1e-3, distill=True, checkpoint=str(tmp_path)), copy.deepcopy(student),
                 _data(), progress=False, teacher=teacher)
    with pytest.raises(ConfigError, match="belongs to another run"):
        run_recovery(RecoveryStage("full", steps=2, lr=5e-3, distill=True, checkpoint=str(tmp_path)),
                     copy.deepcopy(student), _data(), progress=False, teacher=teacher)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the distillation checkpoint"):
        run_recovery(RecoveryStage("full", steps=2, lr=1e-3, distill=True, checkpoint=str(tmp_path)),
                     copy.deepcopy(student), _data(), progress=False, teacher=teacher)


def test_recipe_distils_from_the_model_before_the_recipe(tmp_path):
    """A recipe keeps the unpruned model as the teacher; the YAML round-trips the distill keys."""
    from prunekit.pipeline import run
    from prunekit.recipe import Recipe

    text = """
calibration: {nsamples: 8, seqlen: 32, batch_size: 4}
stages:
  - structure: {structure: neurons, ratio: 0.5}
  - recovery: {method: full, steps: 4, lr: 2.0e-3, distill: {kl: 1.0, temperature: 2.0}}
"""
    recipe = Recipe.from_yaml(text)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    teacher, _ = _pruned_pair()
    model = copy.deepcopy(teacher)
    result = run(recipe, model, data=byte_windows(8, 32))
    stage = result.report["stages"][1]
    assert stage["distill"] and len(stage["loss_curve"]["kl"]) == 4
    assert math.isfinite(stage["loss_last"])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_all_zero_biases_stay_zero():
    """Zero biases stand for structure that is not there (a config's bias switch): recovery
    must not grow them into parameters."""
    teacher, student = _pruned_pair()
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(64))
    run_recovery(RecoveryStage("full", steps=2, lr=1e-2, distill=True), student, _data(), progress=False,
                 teacher=teacher)
    assert not student.model.layers[0].mlp.down_proj.bias.any()
