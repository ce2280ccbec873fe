"""``prunekit bench``: the decode loop matches ``generate``, the result's fields and ratios, the
CSR probe, the CLI contract and its errors. Timings are measured, never asserted as targets."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import last_json, run_cli, tiny_model
from prunekit import StructureConfig, prune
from prunekit.errors import ConfigError
from prunekit.evaluate import count_params
from prunekit.evaluate.bench import BenchConfig, block_ms, greedy_decode, measure, sparse_kernel_probe


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, smol_tokenizer):
    """A tiny dense Llama with the real tokenizer, its magnitude-pruned and neuron-pruned versions."""
    root = tmp_path_factory.mktemp("bench")
    dense = tiny_model("llama", vocab=len(smol_tokenizer))
    dense.save_pretrained(root / "dense")
    smol_tokenizer.save_pretrained(root / "dense")
    import copy

    prune(copy.deepcopy(dense), "magnitude", progress=False, tokenizer=smol_tokenizer).save(root / "mag")
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    prune(copy.deepcopy(dense), StructureConfig.create("neurons", 0.5, "l2"), ids,
          tokenizer=smol_tokenizer, progress=False).save(root / "neu")
    return root


def test_greedy_decode_with_the_cache_equals_generate():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    tokens, seconds = greedy_decode(model, ids, 5)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)[:, 12:]
    assert tokens.shape == (2, 6) and torch.equal(tokens, ref) and seconds > 0


def test_block_times_cover_every_block():
    model = tiny_model("llama")
    times = block_ms(model, torch.randint(0, 256, (1, 16)))
    assert len(times) == model.config.num_hidden_layers and all(t > 0 for t in times)


def test_measure_fields_and_ratios(dirs):
    from prunekit.models.loading import load_model

    models = {}
    for name in ("dense", "mag", "neu"):
        m, tok, src = load_model(str(dirs / name))
        models[name] = (m, tok, src)
    out = measure(models, BenchConfig(prompt_tokens=16, decode_tokens=2, batches=(1, 2), repeats=2, layers=True),
                  progress=False)
    rows = {r["label"]: r for r in out["models"]}
    assert out["baseline"] == "dense" and rows["dense"]["prefill_vs_first"] == 1.0
    assert rows["dense"]["decode_vs_first"] == {"1": 1.0, "2": 1.0}
    for name, r in rows.items():
        assert (r["params_total"], r["params_nonzero"]) == count_params(models[name][0])
        assert len(r["prefill_ms_repeats"]) == 2 and r["prefill_ms"] > 0
        assert set(r["decode_tokens_per_s"]) == {"1", "2"} and min(r["decode_tokens_per_s"].values()) > 0
        assert len(r["block_ms"]) == 2 and r["checkpoint"]["format"] == "dense"
    assert rows["neu"]["params_total"] < rows["dense"]["params_total"]
    assert rows["mag"]["params_nonzero"] < rows["mag"]["params_total"]
    probe = rows["mag"]["sparse_kernel"]  # measured on this device, both ways
    assert probe["dense_ms"] > 0 and probe["csr_ms"] > 0 and probe["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "CSR" in rows["mag"]["kernel"] and rows["dense"]["sparse_kernel"] is None


def test_probe_picks_the_largest_sparse_linear():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(64, 32))
    with torch.no_grad():
        net[0].weight[:, :4] = 0
        net[1].weight[:, :32] = 0
    assert sparse_kernel_probe(net, 4)["layer"] == "1"


def test_cli_contract(capsys, dirs):
    code, out, err = run_cli(capsys, "bench", dirs / "dense", dirs / "neu", "--device", "cpu", "--repeats", 1,
                             "--prompt-tokens", 16, "--decode-tokens", 2, "--batch", 1, 2, "--json", "--quiet")
    assert code == 0, err
    rep = last_json(out)
    assert [r["label"] for r in rep["models"]] == [str(dirs / "dense"), str(dirs / "neu")]
    assert rep["device"] == "cpu" and rep["batches"] == [1, 2] and rep["prompt_tokens"] == 16
    for r in rep["models"]:  # each measured in its own fresh process
        assert r["peak_memory_mb"] > 100 and r["kind"] == "process RSS"
    code, out, _ = run_cli(capsys, "bench", dirs / "dense", "--device", "cpu", "--repeats", 1, "--prompt-tokens", 8,
                           "--decode-tokens", 1, "--batch", 1, "--no-peak-memory", "--quiet")
    assert code == 0 and "| model |" in out and "prefill ms (1x8)" in out


@pytest.mark.parametrize("flags,message", [
    (["--repeats", "0"], "repeats must be at least 1"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--prompt-tokens", "0"], "prompt-tokens must be at least 1"),
])
def test_bad_flags(capsys, dirs, flags, message):
    code, _, err = run_cli(capsys, "bench", dirs / "dense", *flags, "--quiet")
    assert code == 2 and message in err


def test_bad_models(capsys, dirs, tmp_path):
    code, _, err = run_cli(capsys, "bench", dirs / "dense", dirs / "dense", "--quiet")
    assert code == 2 and "twice" in err
    code, _, err = run_cli(capsys, "bench", dirs / "dense", tmp_path / "missing", "--quiet")
    assert code == 2 and "does not exist" in err
    bert = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(capsys, "bench", tmp_path / "bert", "--quiet", "--no-peak-memory")
    assert code == 2 and "causal language models" in err
    with pytest.raises(ConfigError, match="decode-tokens"):
        BenchConfig(decode_tokens=0)
