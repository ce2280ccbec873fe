"""Truth on the real SmolLM2-135M: perplexity matches plain transformers, and data-aware
pruning beats magnitude on the same model, text and seed.

The fast test uses few, short windows; the slow ones (``pytest -m slow``) the benchmark's scale."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from prunekit import Calibration, PruneConfig, prune
from prunekit.calibration.text import calibration_windows, load_text, tokenize
from prunekit.evaluate import perplexity, sparsity_report
from prunekit.models.loading import load_model


@pytest.fixture(scope="module")
def smol():
    model, tok, _ = load_model("default")
    return model, tok


def plain_transformers_ppl(model, ids, seqlen):
    """exp(mean over windows of the loss transformers computes itself)."""
    n = ids.numel() // seqlen
    losses = []
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seqlen : (w + 1) * seqlen][None]
            losses.append(float(model(input_ids=x, labels=x).loss))
    return math.exp(sum(losses) / n)


def test_perplexity_matches_transformers_and_wanda_beats_magnitude(smol):
    model, tok = smol
    eval_ids = tokenize(tok, load_text("default", "eval"))[: 6 * 256]
    dense = perplexity(model, eval_ids, seqlen=256, progress=False)
    assert dense.windows == 6 and dense.tokens == 1536
    assert dense.perplexity == pytest.approx(plain_transformers_ppl(model, eval_ids, 256), rel=1e-4)

    calib = calibration_windows(tokenize(tok, load_text("default", "calib")), 8, 256, seed=0)
    results = {}
    for method in ("magnitude", "wanda"):
        pruned = copy.deepcopy(model)
        cfg = PruneConfig.from_method(method, sparsity=0.5, calibration=Calibration(8, 256))
        prune(pruned, cfg, calib, progress=False)
        assert sparsity_report(pruned)["sparsity"] == pytest.approx(0.5, abs=1e-6)
        results[method] = perplexity(pruned, eval_ids, seqlen=256, progress=False).perplexity
        del pruned
    assert dense.perplexity < results["wanda"] < results["magnitude"]


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ordering_at_benchmark_scale(smol, pattern, tmp_path):
    """SparseGPT and Wanda far below magnitude (here: at most half its perplexity)."""
    model, tok = smol
    eval_ids = tokenize(tok, load_text("default", "eval"))[: 16 * 512]
    calib = calibration_windows(tokenize(tok, load_text("default", "calib")), 16, 512, seed=0)
    dense = perplexity(model, eval_ids, seqlen=512, progress=False).perplexity
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned = copy.deepcopy(model)
        result = prune(pruned, PruneConfig.from_method(method, pattern=pattern, calibration=Calibration(16, 512)),
                       calib, tokenizer=tok, progress=False)
        if pattern == "2:4":  # every group of 4 keeps at most 2; weights already zero on the 4-bit grid may add to it
            assert result.report["nm_valid"] and 0.5 <= result.report["sparsity"] < 0.5 + 1e-4
        else:
            assert result.report["sparsity"] == pytest.approx(0.5, abs=1e-6)
        ppl[method] = perplexity(pruned, eval_ids, seqlen=512, progress=False).perplexity
        if method == "sparsegpt":  # masked weights stay zero through a save/load round trip
            from transformers import AutoModelForCausalLM

            out = result.save(tmp_path / "sgpt")
            again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            for (n, p), (_, q) in zip(pruned.named_parameters(), again.named_parameters()):
                assert torch.equal(p == 0, q == 0), n
        del pruned
    print(f"\n{pattern}: dense {dense:.2f} " + " ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    assert dense < ppl["sparsegpt"] and dense < ppl["wanda"]
    assert ppl["sparsegpt"] < 0.5 * ppl["magnitude"] and ppl["wanda"] < 0.5 * ppl["magnitude"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_prunes_within_two_percent_of_float32(smol, method):
    """A bfloat16 model is pruned in bfloat16 (statistics in float32) to the perplexity of the
    float32 run on the same data, within 2%, averaged over three calibration draws.

    One run is not a fair test: at 50% SparseGPT's pruned perplexity moves by 1-2% in float32
    alone when only the summation order changes (1 vs 2 threads: 26.94 vs 27.33 on 8 x 256
    tokens; another CPU gave 26.79), because masks near the threshold flip and the OBS updates
    carry the flips forward. The mean over seeds and 32 x 256 calibration tokens (5x the largest
    input width, so the Hessian is well determined) measured float32 26.58, bfloat16 26.72."""
    model, tok = smol
    eval_ids = tokenize(tok, load_text("default", "eval"))[: 16 * 256]
    text = tokenize(tok, load_text("default", "calib"))
    cfg = PruneConfig.from_method(method, calibration=Calibration(32, 256))
    ppl = {torch.float32: [], torch.bfloat16: []}
    for seed in (0, 1, 2):
        calib = calibration_windows(text, 32, 256, seed=seed)
        for dtype in ppl:
            pruned = copy.deepcopy(model).to(dtype)
            prune(pruned, cfg, calib, progress=False)
            assert pruned.model.layers[3].mlp.up_proj.weight.dtype == dtype
            ppl[dtype].append(perplexity(pruned.float(), eval_ids, seqlen=256, progress=False).perplexity)
            del pruned
    mean = {dtype: sum(v) / len(v) for dtype, v in ppl.items()}
    print(f"\n{method}: float32 {ppl[torch.float32]} bfloat16 {ppl[torch.bfloat16]}")
    assert mean[torch.bfloat16] == pytest.approx(mean[torch.float32], rel=0.02)
