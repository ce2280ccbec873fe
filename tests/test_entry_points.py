"""The entry points earlier versions documented still work, in their documented form (tiny
models stand in for SmolLM2 here; the real model runs in the slow tests)."""
from __future__ import annotations

import pytest
import torch

from conftest import last_json, run_cli


def test_one_shot_python_api(tiny_llama_dir, tmp_path):
    import prunekit

    model, tokenizer = prunekit.load(str(tiny_llama_dir))
    config = prunekit.PruneConfig.from_method("sparsegpt", pattern="2:4",
                                              calibration=prunekit.Calibration(nsamples=4, seqlen=32))
    data = prunekit.calibration_data(tokenizer, "default", config)  # (4, 32) token ids
    result = prunekit.prune(model, config, data, tokenizer=tokenizer, progress=False)
    assert result.report["sparsity"] == pytest.approx(0.5) and result.report["seconds"] > 0
    ppl = prunekit.evaluate_perplexity(model, tokenizer, "default", seqlen=32, max_tokens=128, progress=False)
    assert ppl.perplexity > 1
    out = result.save(tmp_path / "sgpt")
    assert prunekit.PruneConfig.from_yaml(out / "prunekit_recipe.yaml") == config
    assert isinstance(result, prunekit.PruneResult)


def test_structural_python_api(tmp_path):
    from prunekit.export.structure import load_structured
    from prunekit.models.zoo import ZOO
    from prunekit.structural import StructureConfig, prune_structure

    cnn = ZOO["smallcnn"]().eval()
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    result = prune_structure(cnn, StructureConfig("channels", 0.5, "taylor"), data=(images, labels))
    assert result.report["params_after"] < result.report["params_before"] and result.report["macs_after"] > 0
    result.save(tmp_path / "cnn-50")
    cnn2 = load_structured(tmp_path / "cnn-50", model=ZOO["smallcnn"]())
    with torch.no_grad():
        torch.testing.assert_close(cnn2(images[:2]), cnn(images[:2]))


def test_training_time_api():
    from prunekit.schedules import AtInit, Gradual, prune_at_init
    from prunekit.training import SparsityController

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    masks = prune_at_init(model, AtInit("snip", 0.5), [(x[:16], y[:16])])
    assert sum(int(m.sum()) for m in masks.values()) == sum(m.numel() for m in masks.values()) // 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctrl = SparsityController(model, opt, Gradual(target=0.5, start=0, end=4, frequency=2))
    for _ in range(5):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ctrl.step()
    assert ctrl.sparsity() == pytest.approx(0.5)
    state = ctrl.state_dict()
    ctrl.make_permanent()
    assert state["step"] == 5


def test_readme_cli_forms(capsys, tiny_llama_dir, tmp_path):
    code, out, err = run_cli(capsys, "prune", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5",
                             "--nsamples", 4, "--seqlen", 32, "--eval", "default", "--eval-max-tokens", 64,
                             "--output", tmp_path / "w", "--json", "--quiet")
    assert code == 0, err
    assert {"method", "pattern", "allocation", "target_sparsity", "sparsity", "params_total", "params_nonzero",
            "seconds", "total_seconds", "peak_rss_mb", "perplexity", "tokens", "output"} <= set(last_json(out))
    code, out, err = run_cli(capsys, "prune", tiny_llama_dir, "--structure", "neurons", "--ratio", "0.2",
                             "--nsamples", 4, "--seqlen", 32, "--output", tmp_path / "s", "--json", "--quiet")
    assert code == 0, err
    assert {"params_before", "params_after", "macs_before", "macs_after", "seconds", "exact"} <= set(last_json(out))
    code, out, _ = run_cli(capsys, "eval", tmp_path / "s", "--text", "default", "--max-tokens", 64, "--seqlen", 32,
                           "--json", "--quiet")
    assert code == 0 and last_json(out)["tokens"] == 64
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "allocations:" in out
