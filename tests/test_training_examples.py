"""Every example in examples/ runs end to end with tiny settings and does what it says:
exact sparsity, accuracy above the majority-class baseline of the test labels, the dense
(unpruned) model's metric computed and printed beside the pruned one, and nothing left
behind in the working directory or the temporary directory."""
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from prunekit.datasets import FASHION_MNIST_DIR

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
needs_data = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}: run `apt-get install -y dataset-fashion-mnist` "
           "(scripts/setup.sh does this as root)")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chance():
    from prunekit.datasets import load_fashion_mnist

    _, yt = load_fashion_mnist("test", 1000)
    return yt.bincount().max().item() / len(yt)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def leaves_nothing(tmp_path, monkeypatch):
    """Each example runs in an empty working directory with an empty temporary directory;
    both must be empty again afterwards."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # torch itself makes its (empty, shared) compile cache $TMPDIR/torchinductor_$USER when an
    # optimizer is built; that is torch's cache, not something an example wrote.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))
    yield
    left = sorted(str(p.relative_to(tmp_path)) for d in (cwd, tmp) for p in d.rglob("*"))
    assert not left, f"the example left files behind: {left[:10]}"


def printed_dense(capsys, dense, pruned, metric="accuracy"):
    """The example printed the dense number beside a pruned one, as computed."""
    out = capsys.readouterr().out
    assert f"dense {metric} {dense:.3f}" in out or f"dense {metric} {dense:.2f}" in out, out
    assert any(f"{p:.3f}" in out or f"{p:.2f}" in out for p in pruned), out
    return out


@needs_data
def test_gradual_example(chance, capsys):
    out = load("gradual").main(epochs=2, n_train=2000)
    assert out["sparsity"] == pytest.approx(0.9, abs=1e-4) and out["accuracy"] > chance + 0.15
    assert out["dense accuracy"] > chance + 0.15  # trained with the same budget, no pruning
    assert "pruned (90% sparse)" in printed_dense(capsys, out["dense accuracy"], [out["accuracy"]])
    nm = load("gradual").main(epochs=2, n_train=2000, target=0.5, pattern="2:4")
    assert nm["sparsity"] == 0.5
    assert nm["dense accuracy"] == out["dense accuracy"]  # the same dense run: same seed, data and steps
    assert "pruned (50% sparse, 2:4)" in printed_dense(capsys, nm["dense accuracy"], [nm["accuracy"]])


@needs_data
def test_lottery_ticket_example(chance, capsys):
    rows = load("lottery_ticket").main(rounds=2, epochs=2, n_train=2000, rewind_step=2)
    assert [r["sparsity"] for r in rows] == pytest.approx([0.0, 0.5, 0.75], abs=1e-3)
    assert all(r["ticket"] > chance + 0.15 for r in rows)
    # round 0 is the dense network (no mask); every row carries its accuracy as the baseline
    assert all(r["dense"] == rows[0]["ticket"] for r in rows)
    printed_dense(capsys, rows[0]["dense"], [r["ticket"] for r in rows[1:]])


@needs_data
def test_prune_at_init_example(chance, capsys):
    out = load("prune_at_init").main(epochs=2, n_train=2000, sparsity=0.9, methods=("snip", "synflow"))
    assert set(out) == {"dense", "snip", "snip shuffled", "synflow", "synflow shuffled"}
    assert all(v > chance + 0.15 for v in out.values())  # "dense": same init and epochs, no mask
    text = printed_dense(capsys, out["dense"], [out["snip"]])
    assert text.count(f"dense accuracy {out['dense']:.3f} -> ") == 4


@needs_data
def test_sparse_training_example(chance, capsys):
    out = load("sparse_training").main(epochs=2, n_train=2000, sparsity=0.9)
    assert set(out) == {"dense", "static", "set", "rigl"}
    dense = out.pop("dense")
    assert dense["sparsity"] == 0.0 and dense["accuracy"] > chance + 0.15
    for v in out.values():
        assert v["sparsity"] == pytest.approx(0.9, abs=1e-4) and v["accuracy"] > chance + 0.15
    printed_dense(capsys, dense["accuracy"], [v["accuracy"] for v in out.values()])


@needs_data
def test_recovery_example(chance, capsys):
    out = load("recovery").main(epochs=2, n_train=2000)
    assert out["merged sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert out["dense"] > chance + 0.15  # measured on the trained dense network, before pruning
    printed_dense(capsys, out["dense"], [out["one-shot"], out["masked LoRA, merged"]])
    assert out["biases+norms retrained"] > out["one-shot"] - 0.02  # computed baseline: the pruned model
    assert out["masked LoRA, merged"] > out["one-shot"] - 0.02


def test_hf_trainer_example(tmp_path, capsys):
    kept = tmp_path / "out"  # asked for: the checkpoints stay there
    out = load("hf_trainer").main(max_steps=10, output_dir=str(kept))
    assert out["sparsity"] == 0.5 and out["layers"] == 14
    assert (kept / "checkpoint-5" / "prunekit_sparsity.pt").is_file()
    assert not (kept / "dense").exists()  # the dense baseline's run went to the temporary folder
    # byte-level perplexity on held-out text: finite and better than uniform guessing (256)
    assert 1 < out["dense perplexity"] < 256 and 1 < out["perplexity"] < 256
    assert math.isfinite(out["dense perplexity"]) and out["dense perplexity"] != out["perplexity"]
    printed_dense(capsys, out["dense perplexity"], [out["perplexity"]], metric="perplexity")


def test_hf_trainer_example_cleans_up(capsys):
    out = load("hf_trainer").main(max_steps=4)  # no output_dir: checkpoints go to a deleted temp folder
    assert out["output_dir"] is None and out["sparsity"] == 0.5
    printed_dense(capsys, out["dense perplexity"], [out["perplexity"]], metric="perplexity")
    # the autouse fixture checks that the working and temporary directories are empty again
