"""The CLI contract of structural pruning: flags, --json fields, eval on the result, errors."""
import json

import pytest

from conftest import last_json, run_cli
from prunekit.cli import main  # noqa: F401


run = run_cli


@pytest.mark.parametrize("structure,extra", [("neurons", ["--method", "wanda"]), ("heads", ["--heads", "query"]),
                                             ("layers", ["--method", "block-influence"]), ("channels", [])])
def test_structure_json_then_eval(capsys, tiny_llama_dir, tmp_path, structure, extra):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "prune", tiny_llama_dir, "--structure", structure, "--ratio", 0.5, *extra,
                         "--nsamples", 4, "--seqlen", 32, "--output", out_dir, "--json", "--quiet")
    assert code == 0, err
    rep = last_json(out)
    for key in ("params_before", "params_after", "macs_before", "macs_after", "seconds"):
        assert isinstance(rep[key], (int, float)) and rep[key] > 0, key
    assert rep["params_after"] < rep["params_before"] and rep["macs_after"] < rep["macs_before"]
    assert rep["structure"] == structure and rep["exact"] == (structure != "channels")
    assert (out_dir / "prunekit_structure.json").is_file() and (out_dir / "prunekit_recipe.yaml").is_file()
    code, out, _ = run(capsys, "eval", out_dir, "--seqlen", 32, "--max-tokens", 256, "--json", "--quiet")
    ev = last_json(out)
    assert code == 0 and ev["tokens"] == 256 and ev["params_total"] == rep.get("params_saved", rep["params_after"])
    code, out, _ = run(capsys, "prune", tiny_llama_dir, "--recipe", out_dir / "prunekit_recipe.yaml",
                       "--output", tmp_path / "again", "--json", "--quiet")
    assert code == 0 and last_json(out)["params_after"] == rep["params_after"]


@pytest.mark.parametrize("args,message", [
    (["--structure", "heads", "--ratio", "0.9"], "would remove all 2 units"),
    (["--structure", "heads", "--ratio", "1.5"], "outside [0, 1)"),
    (["--structure", "neurons"], "needs --ratio"),
    (["--structure", "neurons", "--ratio", "0.2", "--sparsity", "0.5"], "--sparsity is for weight pruning"),
    (["--structure", "neurons", "--ratio", "0.2", "--method", "sparsegpt"], "unknown structural score"),
    (["--structure", "layers", "--ratio", "0.2", "--method", "l2"], "unknown layer score"),
    (["--structure", "experts", "--ratio", "0.5"], "no mixture-of-experts"),
    (["--structure", "neurons", "--ratio", "0.2", "--allocation", "owl"], "uniform' or 'global"),
    (["--ratio", "0.2"], "--ratio goes with --structure"),
    (["--structure", "neurons", "--ratio", "0.2", "--override", "nothing"], "use REGEX=R"),
    (["--structure", "neurons", "--ratio", "0.2", "--override", "x=1.5"], "override ratio 1.5"),
])
def test_bad_structural_input_exits_2_and_writes_nothing(capsys, tiny_llama_dir, tmp_path, args, message):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "prune", tiny_llama_dir, *args, "--nsamples", 2, "--seqlen", 32, "--output", out_dir)
    assert code == 2 and message in err, err
    assert not out_dir.exists()


def test_override_flag(capsys, tiny_llama_dir, tmp_path):
    code, out, err = run(capsys, "prune", tiny_llama_dir, "--structure", "neurons", "--ratio", "0.5", "--method", "l2",
                         "--override", r"layers\.0\.=0", "--nsamples", 2, "--seqlen", 32, "--latency",
                         "--output", tmp_path / "o", "--json", "--quiet")
    assert code == 0, err
    rep = last_json(out)
    assert rep["latency_ms_before"] > 0 and rep["latency_ms_after"] > 0
    report = json.loads((tmp_path / "o" / "prunekit_report.json").read_text())
    assert [(g["name"], g["removed"]) for g in report["groups"]] == [("model.layers.0.mlp", 0), ("model.layers.1.mlp", 64)]


def test_weight_pruning_on_top_of_a_non_uniform_structure(capsys, tiny_llama_dir, tmp_path):
    """heads from layer 1 only (non-uniform), then Wanda 50%: the result still reloads."""
    code, out, err = run(capsys, "prune", tiny_llama_dir, "--structure", "heads", "--ratio", "0.5", "--method", "l2",
                         "--override", r"layers\.0\.=0", "--nsamples", 2, "--seqlen", 32,
                         "--output", tmp_path / "s", "--json", "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "prune", tmp_path / "s", "--method", "wanda", "--sparsity", "0.5", "--nsamples", 2,
                         "--seqlen", 32, "--output", tmp_path / "w", "--json", "--quiet")
    assert code == 0, err
    params = last_json(out)["params_total"]
    code, out, err = run(capsys, "eval", tmp_path / "w", "--seqlen", 32, "--max-tokens", 128, "--json", "--quiet")
    assert code == 0, err
    ev = last_json(out)
    assert ev["params_total"] == params and abs(ev["sparsity"] - 0.5) < 0.01
