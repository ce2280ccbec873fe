"""Every example in examples/ runs end to end with tiny settings and does what it says:
exact sparsity, and accuracy above the majority-class baseline of the test labels."""
import importlib.util
import sys
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


@needs_data
def test_gradual_example(chance):
    out = load("gradual").main(epochs=2, n_train=2000)
    assert out["sparsity"] == pytest.approx(0.9, abs=1e-4) and out["accuracy"] > chance + 0.15
    nm = load("gradual").main(epochs=2, n_train=2000, target=0.5, pattern="2:4")
    assert nm["sparsity"] == 0.5


@needs_data
def test_lottery_ticket_example(chance):
    rows = load("lottery_ticket").main(rounds=2, epochs=2, n_train=2000, rewind_step=2)
    assert [r["sparsity"] for r in rows] == pytest.approx([0.0, 0.5, 0.75], abs=1e-3)
    assert all(r["ticket"] > chance + 0.15 for r in rows)


@needs_data
def test_prune_at_init_example(chance):
    out = load("prune_at_init").main(epochs=2, n_train=2000, sparsity=0.9, methods=("snip", "synflow"))
    assert set(out) == {"snip", "snip shuffled", "synflow", "synflow shuffled"}
    assert all(v > chance + 0.15 for v in out.values())


@needs_data
def test_sparse_training_example(chance):
    out = load("sparse_training").main(epochs=2, n_train=2000, sparsity=0.9)
    assert set(out) == {"static", "set", "rigl"}
    for v in out.values():
        assert v["sparsity"] == pytest.approx(0.9, abs=1e-4) and v["accuracy"] > chance + 0.15


@needs_data
def test_recovery_example():
    out = load("recovery").main(epochs=2, n_train=2000)
    assert out["merged sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert out["biases+norms retrained"] > out["one-shot"] - 0.02  # computed baseline: the pruned model
    assert out["masked LoRA, merged"] > out["one-shot"] - 0.02


def test_hf_trainer_example(tmp_path):
    out = load("hf_trainer").main(max_steps=10, output_dir=str(tmp_path))
    assert out["sparsity"] == 0.5 and out["layers"] == 14
    assert (tmp_path / "checkpoint-5" / "prunekit_sparsity.pt").is_file()
