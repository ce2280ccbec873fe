"""2:4 semi-structured kernels: which Linear layers qualify (pattern, dtype, shape, tied), the
device check, refusal on a device without the kernels, and the bench's record of them. On a
CUDA GPU (``gpu``): converted layers and a whole model match their dense outputs, and the
kernel's time beside dense's is recorded (never asserted)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import last_json, run_cli, tiny_model
from prunekit import prune
from prunekit.errors import ConfigError, KernelUnavailableError
from prunekit.evaluate.bench import BenchConfig, measure, table
from prunekit.export import kernels
from prunekit.export.kernels import (accelerate_24, classify_24, find_24_linears, kernel_constraint, pattern_violation,
                                     semi_structured_support)

TWO_FOUR = {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}


def masked_linear(out_f: int, in_f: int, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> nn.Linear:
    """A Linear whose weight keeps, in every group of 4 inputs of every row, 2 positions drawn at random."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    keep = torch.rand(out_f, in_f // 4, 4, generator=g).argsort(dim=2) < 2  # (out, in/4, 4), two True per group
    with torch.no_grad():
        lin.weight.mul_(keep.reshape(out_f, in_f))
    return lin.to(device=device, dtype=dtype)


def pruned_llama(dtype=torch.bfloat16) -> nn.Module:
    model = tiny_model("llama")
    prune(model, TWO_FOUR, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), progress=False)
    return model.to(dtype)


BLOCK_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")]


def test_prunekit_24_pruning_qualifies_every_block_linear_and_one_broken_group_excludes_a_layer():
    model = pruned_llama()
    assert find_24_linears(model) == BLOCK_LINEARS
    _, skipped = classify_24(model)
    assert list(skipped) == ["lm_head"] and skipped["lm_head"].startswith("not 2:4")
    w = model.model.layers[1].mlp.up_proj.weight  # (128, 64)
    with torch.no_grad():
        zero = int((w[5, 8:12] == 0).nonzero()[0])
        w[5, 8 + zero] = 0.5  # that group now keeps 3 of 4
    names, skipped = classify_24(model)
    assert "model.layers.1.mlp.up_proj" not in names and len(names) == len(BLOCK_LINEARS) - 1
    assert skipped["model.layers.1.mlp.up_proj"] == (
        "not 2:4: 1 of 2048 groups of 4 inputs keep more than 2 weights (first: row 5, inputs 8-11 keep 3)")


def test_hand_made_mask_more_zeros_still_qualify_and_float32_does_not():
    lin = masked_linear(64, 128)
    with torch.no_grad():
        lin.weight[0, :4] = 0  # a group with 4 zeros: at least 2 of every 4 are still zero
        lin.weight[3, 4:8] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert pattern_violation(lin.weight) is None
    net = nn.Sequential(lin, nn.ReLU(), masked_linear(64, 64).float())
    names, skipped = classify_24(net)
    assert names == ["0"] and skipped["2"].startswith("dtype float32: ") and "bfloat16" in skipped["2"]
    with torch.no_grad():
        lin.weight[63, 124:128] = 1.0
    assert pattern_violation(lin.weight) == (
        "not 2:4: 1 of 2048 groups of 4 inputs keep more than 2 weights (first: row 63, inputs 124-127 keep 4)")
    assert pattern_violation(torch.zeros(8, 6)) == "not 2:4: 6 input features are not divisible by 4"


@pytest.mark.parametrize("shape,dtype,backend,expected", [
    ((64, 128), torch.float16, "cutlass", None),
    ((64, 128), torch.bfloat16, "cusparselt", None),
    ((48, 64), torch.float16, "cusparselt", None),  # cuSPARSELt: multiples of (16, 16)
    ((48, 64), torch.float16, "cutlass", "multiples of (32, 64)"),  # CUTLASS: rows of 32, columns of 64
    ((64, 96), torch.bfloat16, "cutlass", "multiples of (32, 64)"),
    ((24, 64), torch.bfloat16, "cusparselt", "multiples of (16, 16)"),
    ((64, 8), torch.float16, "cusparselt", "multiples of (16, 16)"),
    ((64, 128), torch.float32, "cutlass", "dtype float32"),
    ((64, 128), torch.int8, "cusparselt", "dtype int8"),
])
def test_kernel_constraints(shape, dtype, backend, expected):
    got = kernel_constraint(shape, dtype, backend)
    if expected is None:
        assert got is None
    else:
        assert expected in got and (expected.startswith("dtype") or got.startswith(f"shape {shape}: the {backend}"))


def test_constraints_follow_the_backend_and_tied_weights_are_excluded():
    net = nn.Sequential(masked_linear(48, 64))
    assert find_24_linears(net, "cusparselt") == ["0"] and find_24_linears(net, "cutlass") == []
    with pytest.raises(ValueError, match="unknown semi-structured backend 'cublas'"):
        find_24_linears(net, "cublas")

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 128).to(torch.bfloat16)
            self.head = masked_linear(64, 128)
            self.embed.weight = self.head.weight

    names, skipped = classify_24(Tied())
    assert names == [] and "shared with 1 other module(s) (tied)" in skipped["head"]


def test_support_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert semi_structured_support("cpu") == (False, "no CUDA device")
    assert semi_structured_support("cuda") == (False, "no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    ok, why = semi_structured_support("cuda:0")
    assert not ok and why.startswith("compute capability 7.5 < 8.0") and "Tesla T4" in why
    ok, why = semi_structured_support("cpu")
    assert not ok and "on cpu, not a CUDA device" in why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    ok, why = semi_structured_support("cuda:0")
    assert ok and "compute capability 9.0" in why and kernels.backend_name() in why


def test_accelerate_24_refuses_on_cpu_and_leaves_the_model_alone():
    model = pruned_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KernelUnavailableError, match="cannot run: .*compute capability >= 8.0"):
        accelerate_24(model)
    after = model.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama (the baseline) and its 2:4 magnitude pruning, saved."""
    import prunekit

    root = tmp_path_factory.mktemp("kernels")
    model, tok = prunekit.load(str(tiny_llama_dir))
    prune(model, TWO_FOUR, tokenizer=tok, progress=False, data=torch.randint(0, 1000, (2, 16))).save(root / "24")
    return tiny_llama_dir, root / "24"


def test_bench_says_why_no_24_speedup_was_measured(capsys, bench_dirs):
    dense, pruned = bench_dirs
    flags = ["--device", "cpu", "--dtype", "bfloat16", "--repeats", 1, "--prompt-tokens", 8, "--decode-tokens", 1,
             "--batch", 1, "--no-peak-memory", "--quiet"]
    code, out, err = run_cli(capsys, "bench", dense, pruned, *flags, "--json")
    assert code == 0, err
    rep = last_json(out)
    sk = rep["sparse_kernels"]
    assert sk["mode"] == "auto" and sk["available"] is False and sk["models"] == {}
    if not torch.cuda.is_available():
        assert sk["reason"] == "no CUDA device"
    assert [r["label"] for r in rep["models"]] == [str(dense), str(pruned)]  # no kernel row, the same two
    code, out, err = run_cli(capsys, "bench", dense, pruned, *flags)
    assert code == 0 and "| model |" in out
    note = [line for line in out.splitlines() if line.startswith("No 2:4 kernel speed-up was measured: ")]
    assert len(note) == 1 and sk["reason"] in note[0] and "every model ran dense" in note[0]
    code, out, err = run_cli(capsys, "bench", dense, pruned, *flags, "--sparse-kernels", "off")
    assert code == 0 and "No 2:4" not in out
    code, _, err = run_cli(capsys, "bench", dense, pruned, *flags, "--sparse-kernels", "on")
    assert code == 2 and "--sparse-kernels on: 2:4 kernels cannot run: " + sk["reason"] in err
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "bench", dense, *flags, "--sparse-kernels", "fast")
    assert exc.value.code == 2 and "--sparse-kernels: invalid choice: 'fast'" in capsys.readouterr().err


def test_bench_rows_of_kernel_copies(monkeypatch):
    """The bench's plumbing where the kernels exist, with a stand-in conversion (this machine
    has none): one extra row per pruned 2:4 model, its counts from the source, ratios to it."""
    def fake_accelerate(model, *, check=True):
        return {"converted": find_24_linears(model), "skipped": {}, "backend": "stand-in", "max_rel_error": 0.0}

    monkeypatch.setattr(kernels, "semi_structured_support", lambda device: (True, "stand-in device"))
    monkeypatch.setattr(kernels, "accelerate_24", fake_accelerate)
    dense = tiny_model("llama").to(torch.bfloat16)
    models = {"dense": (dense, None, None), "24": (pruned_llama(), None, None),
              "dense again": (copy.deepcopy(dense), None, None)}
    cfg = BenchConfig(prompt_tokens=8, decode_tokens=1, batches=(1,), repeats=1, warmup=0, peak_memory=False)
    out = measure(models, cfg, progress=False)
    rows = {r["label"]: r for r in out["models"]}
    assert list(rows) == ["dense", "24", "24 [2:4 kernels]", "dense again"]
    fast, src = rows["24 [2:4 kernels]"], rows["24"]
    assert fast["kernels_of"] == "24" and fast["sparse_kernel"] is None and "14 Linear layers" in fast["kernel"]
    assert (fast["params_total"], fast["params_nonzero"]) == (src["params_total"], src["params_nonzero"])
    assert fast["prefill_vs_source"] == pytest.approx(fast["prefill_ms"] / src["prefill_ms"])
    assert set(fast["decode_vs_source"]) == {"1"} and fast["prefill_vs_first"] > 0
    assert out["sparse_kernels"]["models"]["24"]["converted"] == 14 and "note" not in out["sparse_kernels"]
    assert "| 24 [2:4 kernels] |" in table(out) and "No 2:4" not in table(out)
    with pytest.raises(ConfigError, match="--sparse-kernels on: no pruned model .*dense again: not 2:4"):
        measure({"dense": models["dense"], "dense again": models["dense again"]},
                BenchConfig(prompt_tokens=8, decode_tokens=1, batches=(1,), repeats=1, peak_memory=False,
                            sparse_kernels="on"), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole benchmark")
def test_gpu_payoff_script_exits_with_the_reason_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "payoff" / "gpu_24.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "compute capability >= 8.0; not here: no CUDA device" in done.stderr


# ---- on a CUDA GPU of compute capability >= 8.0 ----

def needs_kernels() -> None:
    ok, why = semi_structured_support("cuda")
    if not ok:
        pytest.skip(f"2:4 kernels unavailable: {why}")


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.gpu
def test_gpu_fp16_linear_2048_matches_dense():
    needs_kernels()
    lin = masked_linear(2048, 2048, dtype=torch.float16, device="cuda")
    x2 = torch.randn(64, 2048, device="cuda", dtype=torch.float16)
    x3 = torch.randn(2, 7, 2048, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref2, ref3 = lin(x2), lin(x3)
    net = nn.Sequential(lin)
    report = accelerate_24(net)
    assert report["converted"] == ["0"] and isinstance(net[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.inference_mode():
        assert rel_error(net(x2), ref2) < 1e-2 and rel_error(net(x3), ref3) < 1e-2
        assert net(x3).shape == (2, 7, 2048)


@pytest.mark.gpu
def test_gpu_bf16_model_matches_dense():
    needs_kernels()
    model = pruned_llama().cuda()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        ref = model(ids).logits
    report = accelerate_24(model)
    assert report["converted"] == BLOCK_LINEARS and list(report["skipped"]) == ["lm_head"]
    with torch.inference_mode():
        assert rel_error(model(ids).logits, ref) < 3e-2


@pytest.mark.gpu
def test_gpu_timing_is_recorded(record_property):
    """A 4096 x 4096 bf16 2:4 weight over 2048 tokens, dense and compressed; numbers only."""
    needs_kernels()
    import time

    lin = masked_linear(4096, 4096, device="cuda")
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    fast = copy.deepcopy(lin)
    accelerate_24(nn.Sequential(fast))

    def ms(layer: nn.Module) -> float:
        with torch.inference_mode():
            for _ in range(3):
                layer(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                layer(x)
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / 20 * 1e3

    dense_ms, sparse_ms = ms(lin), ms(fast)
    record_property("dense_ms", dense_ms)
    record_property("kernel_ms", sparse_ms)
    print(f"4096x4096 bf16 @ 2048 tokens: dense {dense_ms:.3f} ms, 2:4 kernel {sparse_ms:.3f} ms")
    assert dense_ms > 0 and sparse_ms > 0
