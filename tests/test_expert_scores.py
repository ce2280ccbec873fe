"""Expert scores by reconstruction (REAP, EASY-EP, greedy removal): each checked against a hand
computation from explicit hooks and the raw expert weights, removal checked against router
masking (logits at -inf), greedy's first pick checked against brute force."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import MaskRouter, last_json, run_cli, tiny_moe
from prunekit.calibration import CalibrationData, RunOptions
from prunekit.errors import ConfigError, StructureError
from prunekit.structural import prune_structure
from prunekit.structural.config import StructureConfig
from prunekit.structural.experts import EXPERT_SCORES, find_moe_layers, greedy_removal

NEW = ["reap", "easy_ep", "greedy"]
OPTS = RunOptions(progress=False)


def moe(kind: str, experts: int = 4, seed: int = 0, vocab: int = 128) -> torch.nn.Module:
    """A tiny random MoE decoder, hidden 32, 2 blocks, top-2."""
    return tiny_moe(kind, experts, seed, vocab, hidden=32)


IDS = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
DATA = CalibrationData.from_ids(IDS, batch_size=2)  # two batches: scores accumulate


def moe_inputs(model) -> list[torch.Tensor]:
    """Each MoE layer's input ``(tokens, hidden)`` on the dense model, seen by explicit hooks."""
    seen: list[torch.Tensor] = []
    mods = [m.mlp for m in model.model.layers]
    handles = [m.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
               for m in mods]
    with torch.no_grad():
        model(input_ids=IDS)
    for h in handles:
        h.remove()
    return seen


def hand_routing(mlp, x):
    """Top-k gate weights by hand: softmax over all experts, top-k, renormalised when the
    model renormalises (Mixtral always; Qwen2-MoE and OLMoE by ``norm_topk_prob``)."""
    probs = torch.softmax(x @ mlp.gate.weight.t(), dim=-1)  # (T, E)
    w, idx = probs.topk(mlp.gate.top_k, dim=-1)  # (T, k)
    if getattr(mlp.gate, "norm_topk_prob", True):
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def hand_expert(mlp, e, x):
    """Expert ``e`` on ``x`` (T, hidden) from its raw weights: down(silu(gate) * up)."""
    gate, up = (x @ mlp.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ mlp.experts.down_proj[e].t()  # (T, hidden)


def hand_scores(model):
    """Per layer (reap, easy_ep), straight from the formulas of the two papers."""
    out = []
    with torch.no_grad():
        for mlp, x in zip([m.mlp for m in model.model.layers], moe_inputs(model)):
            w, idx = hand_routing(mlp, x)
            n = mlp.gate.weight.shape[0]
            ys = torch.stack([hand_expert(mlp, e, x) for e in range(n)], 1)  # (T, E, hidden)
            gw = torch.zeros(x.shape[0], n).scatter(1, idx, w)  # (T, E), 0 off the top-k
            routed = (gw[..., None] * ys).sum(1)  # (T, hidden)
            s = torch.clamp(1 - F.cosine_similarity(x, x + routed, dim=-1), min=0)  # (T,)
            c = gw * ys.norm(dim=-1)  # (T, E)
            hit = (gw > 0).double().sum(0)
            reap = c.double().sum(0) / hit.clamp(min=1)
            easy = (c * s[:, None]).double().sum(0)
            out.append((reap.float(), easy.float()))
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_reap_and_easy_ep_equal_hand_computation(kind):
    model = moe(kind)
    layers = find_moe_layers(model)
    gen = torch.Generator().manual_seed(0)
    reap = EXPERT_SCORES.get("reap")(model, layers, DATA, gen, OPTS)
    easy = EXPERT_SCORES.get("easy_ep")(model, layers, DATA, gen, OPTS)
    for (r, e), got_r, got_e in zip(hand_scores(model), reap, easy):
        torch.testing.assert_close(got_r, r, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_e, e, rtol=1e-4, atol=1e-6)
        assert got_r.shape == (4,) and (got_r > 0).all()


def test_easy_ep_is_reap_times_count_without_token_weights(monkeypatch):
    """With s_t = 1 (cosine patched to 0), EASY-EP equals REAP times each expert's routed count."""
    model = moe("mixtral")
    layers = find_moe_layers(model)
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr("prunekit.structural.experts.F.cosine_similarity",
                        lambda a, b, dim: torch.zeros(a.shape[0], device=a.device))
    easy = EXPERT_SCORES.get("easy_ep")(model, layers, DATA, gen, OPTS)
    reap = EXPERT_SCORES.get("reap")(model, layers, DATA, gen, OPTS)
    for mlp, x, r, e in zip([m.mlp for m in model.model.layers], moe_inputs(model), reap, easy):
        _, idx = hand_routing(mlp, x)
        count = torch.bincount(idx.reshape(-1), minlength=4).float()
        torch.testing.assert_close(e, r * count, rtol=1e-4, atol=1e-6)


def brute_force_errors(mlp, x, dropped):
    """||F_{dropped+e}(x) - F(x)||^2 for every expert e not yet dropped, by router masking."""
    with torch.no_grad():
        dense = mlp(x[None])
        errors = {}
        for e in range(mlp.gate.weight.shape[0]):
            if e in dropped:
                continue
            with MaskRouter([mlp.gate.weight], [dropped + [e]]):
                errors[e] = float((mlp(x[None]).double() - dense.double()).square().sum())
    return errors


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_greedy_first_two_removals_are_brute_force_argmins(kind):
    model = moe(kind, experts=6)
    layers = find_moe_layers(model)
    scores = EXPERT_SCORES.get("greedy")(model, layers, DATA, torch.Generator().manual_seed(0), OPTS)
    for mlp, x, s in zip([m.mlp for m in model.model.layers], moe_inputs(model), scores):
        assert sorted(s.tolist()) == list(range(6))  # a removal order
        first = brute_force_errors(mlp, x, [])
        assert int(s.argmin()) == min(first, key=first.get)
        second = brute_force_errors(mlp, x, [int(s.argmin())])
        assert int((s == 1).nonzero()) == min(second, key=second.get)


def test_greedy_scoring_leaves_the_model_as_it_was():
    model = moe("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    EXPERT_SCORES.get("greedy")(model, find_moe_layers(model), DATA, torch.Generator().manual_seed(0), OPTS)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    mlp = model.model.layers[0].mlp
    assert mlp.gate.num_experts == 4 and mlp.experts.num_experts == 4


def test_greedy_removal_order_by_hand():
    """Additive errors: the order is ascending cost; the two survivors rank by last-round error."""
    cost = [5.0, 1.0, 3.0, 2.0, 4.0]
    scores = greedy_removal(5, 2, lambda drop: sum(cost[e] for e in drop))
    assert scores.tolist() == [4.0, 0.0, 2.0, 1.0, 3.0]
    assert greedy_removal(3, 3, lambda drop: 0.0).tolist() == [0.0, 1.0, 2.0]  # nothing removable


@pytest.mark.parametrize("method", NEW + ["frequency"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_removal_equals_router_masking(kind, method):
    model = moe(kind, experts=8)
    ref = copy.deepcopy(model)
    result = prune_structure(model, StructureConfig("experts", 0.5, method), data=IDS)
    drops = [g["removed_indices"] for g in result.report["groups"]]
    assert all(len(d) == 4 for d in drops)
    assert all(m.mlp.gate.weight.shape[0] == 4 for m in model.model.layers)
    with torch.no_grad(), MaskRouter([m.mlp.gate.weight for m in ref.model.layers], drops):
        expected = ref(input_ids=IDS).logits
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", NEW)
def test_scores_follow_the_requested_ratio(method):
    model = moe("mixtral", experts=8)
    r = prune_structure(model, StructureConfig("experts", 0.25, method), data=IDS)
    assert [g["removed"] for g in r.report["groups"]] == [2, 2] and model.config.num_local_experts == 6


@pytest.mark.parametrize("method", NEW)
def test_errors(method):
    model = moe("mixtral")
    with pytest.raises(ConfigError, match=f"{method!r} needs calibration data"):
        EXPERT_SCORES.get(method)(model, find_moe_layers(model), None, torch.Generator(), OPTS)
    with pytest.raises(ConfigError, match="outside"):
        StructureConfig("experts", 1.0, method)
    with pytest.raises(ConfigError, match="removes nothing"):
        prune_structure(moe("mixtral"), StructureConfig("experts", 0.1, method), data=IDS)
    with pytest.raises(ConfigError, match="fewer than top_k"):
        prune_structure(moe("mixtral"), StructureConfig("experts", 0.75, method), data=IDS)


@pytest.mark.parametrize("method", ["reap", "easy_ep"])
def test_a_router_without_routing_output_is_named(method, monkeypatch):
    model = moe("mixtral")
    router = model.model.layers[0].mlp.gate
    forward = router.forward
    monkeypatch.setattr(router, "forward", lambda h: forward(h)[0])
    with pytest.raises(StructureError, match="model.layers.0.mlp does not return"):
        EXPERT_SCORES.get(method)(model, find_moe_layers(model), DATA, torch.Generator(), OPTS)


def test_cli_prunes_experts_by_reap(capsys, tmp_path, smol_tokenizer):
    src = tmp_path / "moe"
    model = moe("mixtral", experts=4, vocab=len(smol_tokenizer))
    model.save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    code, out, err = run_cli(capsys, "prune", src, "--structure", "experts", "--method", "reap", "--ratio", 0.5,
                             "--nsamples", 2, "--seqlen", 16, "--output", tmp_path / "out", "--json", "--quiet")
    assert code == 0, err
    rep = last_json(out)
    assert rep["params_after"] < rep["params_before"]
