"""Contracts every registry entry must meet, generated from the registries themselves, so a
new score, pattern, allocation or reconstruction is tested the moment it is registered."""
from __future__ import annotations

import pytest
import torch

from prunekit.allocation import ALLOCATIONS, LayerRef
from prunekit.calibration.stats import InputStats
from prunekit.config import Allocation, SparseGPTParams
from prunekit.patterns import MaskSpec, is_nm
from prunekit.reconstruct import RECONSTRUCTIONS, GroupProblem, Segment
from prunekit.reconstruct.mask_only import choose_masks
from prunekit.refine import REFINEMENTS, RefineProblem
from prunekit.scoring import SCORES, LayerStats

SPECS = [MaskSpec("unstructured", 0.5, "row"), MaskSpec("unstructured", 0.7, "layer"), MaskSpec("nm", n=2, m=4),
         MaskSpec("nm", n=4, m=8)]


def make_problem(score: str, spec: MaskSpec, dtype=torch.float32, seed=0) -> GroupProblem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)  # (tokens, in)
    inputs = InputStats(32, gram=True, device=x.device)
    inputs.add(x)
    weight = torch.randn(24, 32, generator=g).to(dtype)  # (out, in)
    grad = torch.randn(24, 32, generator=g)  # (out, in), for gradient scores
    stats = LayerStats(input_norm=inputs.input_norm, generator=torch.Generator().manual_seed(seed), grad=grad)
    return GroupProblem(weight, (Segment(0, 24, spec),), SCORES.get(score), stats, inputs,
                        SparseGPTParams(blocksize=8))


def check_pattern(w: torch.Tensor, pruned: torch.Tensor, spec: MaskSpec) -> None:
    if spec.kind == "nm":
        assert is_nm(w, spec.n, spec.m)
        assert int(pruned.sum()) == w.numel() * (spec.m - spec.n) // spec.m
    elif spec.group == "row":
        assert (pruned.sum(1) == round(spec.amount * w.shape[1])).all()
    else:
        assert int(pruned.sum()) == round(spec.amount * w.numel())
    assert (w[pruned] == 0).all()


@pytest.mark.parametrize("score", SCORES.names())
@pytest.mark.parametrize("reconstruction", RECONSTRUCTIONS.names())
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_score_pattern_reconstruction(score, reconstruction, spec):
    problem = make_problem(score, spec)
    new_w, pruned = RECONSTRUCTIONS.get(reconstruction)(problem)
    assert new_w.shape == problem.weight.shape and pruned.dtype == torch.bool
    assert new_w.dtype == torch.float32 and torch.isfinite(new_w).all()
    check_pattern(new_w, pruned, spec)
    again = RECONSTRUCTIONS.get(reconstruction)(make_problem(score, spec))  # same seed, same result
    assert torch.equal(again[1], pruned) and torch.equal(again[0], new_w)


@pytest.mark.parametrize("score", SCORES.names())
def test_scores_are_elementwise_and_keep_shape(score):
    problem = make_problem(score, SPECS[0])
    upper, _ = problem.inverse_factor()
    stats = LayerStats(problem.stats.input_norm, upper.square().sum(0).sqrt(), torch.Generator().manual_seed(0),
                       problem.stats.grad)
    s = SCORES.get(score)(problem.weight, stats)
    assert s.shape == problem.weight.shape and torch.isfinite(s).all() and (s >= 0).all()


@pytest.mark.parametrize("name", REFINEMENTS.names())
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_refinement_keeps_counts_pattern_and_dtype(name, spec, dtype):
    """A refinement changes which weights are kept, never how many (per row or per layer, as
    the pattern counts them), never the N:M pattern, and returns the weight's own dtype."""
    problem = make_problem("wanda", spec)
    pruned = choose_masks(problem)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1)) + 0.5  # (tokens, in), with means
    inputs = InputStats(32, moments=True)
    inputs.add(x)
    dense = problem.weight.to(dtype)
    refine = RefineProblem(dense, dense.masked_fill(pruned, 0), pruned, inputs.mean.float(), inputs.variance.float(),
                           inputs.input_norm, spec)
    weight, after = REFINEMENTS.get(name)(refine)
    assert weight.dtype == dtype and after.dtype == torch.bool and weight.shape == dense.shape
    check_pattern(weight, after, spec)
    assert torch.equal(after.sum(1), pruned.sum(1))
    again = REFINEMENTS.get(name)(refine)
    assert torch.equal(again[0], weight) and torch.equal(again[1], after)


@pytest.mark.parametrize("name", ALLOCATIONS.names())
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_every_allocation(name, sparsity):
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(16, 16, generator=g) * (1 + i) ** 2 for i in range(6)]
    refs = [LayerRef(f"l{i}", i // 2, s.numel(), lambda s=s: s) for i, s in enumerate(scores)]
    amounts = ALLOCATIONS.get(name)(refs, sparsity, Allocation(name))
    assert len(amounts) == len(refs) and all(0.0 <= a <= 1.0 for a in amounts)
    mean = sum(a * r.numel for a, r in zip(amounts, refs)) / sum(r.numel for r in refs)
    assert mean == pytest.approx(sparsity, abs=0.01)
    assert ALLOCATIONS.get(name)(refs, sparsity, Allocation(name)) == amounts  # deterministic


def test_every_registry_has_generated_contract_tests():
    """A new registry must come with contract tests generated over its entries: this lists the
    registries that have them (here and in test_dtype_device.py, test_models.py, test_adapters.py,
    test_data_pruning.py for data scores, test_delta.py for delta and merge methods, test_kv.py for
    KV-cache policies)."""
    import prunekit.kv.policies  # noqa: F401  (kv_policies: contracts in test_kv.py)
    from prunekit.registry import ALL, catalogue

    catalogue()  # imports every module that registers entries
    covered = {"scores", "patterns", "allocations", "reconstructions", "methods", "unit_scores", "layer_scores",
               "expert_scores", "init_scores", "adapters", "data_scores", "delta_methods", "merge_methods",
               "refinements", "kv_policies", "token_methods"}
    assert set(ALL) == covered


@pytest.mark.parametrize("method", __import__("prunekit.config", fromlist=["METHODS"]).METHODS.names())
def test_every_method_preset_resolves_and_prunes_exactly(method):
    from conftest import tiny_model
    from prunekit.config import PruneConfig
    from prunekit.evaluate import sparsity_report
    from prunekit.resolve import check
    from prunekit.schedules import prune_oneshot

    cfg = PruneConfig.from_method(method, sparsity=0.5)
    check(cfg)
    model = tiny_model("llama")
    prune_oneshot(model, cfg, torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)),
                  progress=False)
    assert sparsity_report(model)["sparsity"] == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("name", __import__("prunekit.models.adapters", fromlist=["ADAPTERS"]).ADAPTERS.names())
def test_every_adapter_finds_its_family_blocks(name):
    import transformers as tf

    from prunekit.models.adapters import adapter_for
    from prunekit.models.decoder import find_blocks

    configs = {"generic": tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1),
               "gpt2": tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2),
               "opt": tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   word_embed_proj_dim=32),
               "bert": tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)}
    cls = tf.BertModel if name == "bert" else tf.AutoModelForCausalLM.from_config
    model = cls(configs[name])
    adapter = adapter_for(model)
    assert adapter.name == name
    path, blocks = find_blocks(model)
    assert len(blocks) == 2 and (adapter.blocks is None or path.endswith(adapter.blocks))
