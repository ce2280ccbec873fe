"""Data-parallel calibration (prunekit.calibration.distributed): two gloo ranks on this CPU,
launched by torchrun through the real CLI, against the single-process run on the same model and
data: the very same model for Wanda, float-tolerance agreement for SparseGPT (2:4 too);
rank 0 alone writes and reports; what is not data-parallel, too few batches for the ranks, and
ranks that disagree each stop every rank with an error instead of hanging."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.calibration.distributed import shard_bounds

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(),
                                reason="torch.distributed / torchrun are not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], ranks: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():  # gloo on the loopback: a host name that does not resolve cannot stop it
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [str(TORCHRUN), f"--nproc-per-node={ranks}", f"--master-port={free_port()}", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def prune_args(model: Path, out: Path, method: str, pattern: str) -> list[str]:
    return ["prune", str(model), "--method", method, "--sparsity", "0.5", "--pattern", pattern, "--nsamples", "8",
            "--seqlen", "32", "--batch-size", "2", "--output", str(out), "--quiet", "--json"]


def test_shard_bounds_cover_every_batch_once():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                            ("sparsegpt", "2:4")])
def test_two_gloo_ranks_equal_one_process(tiny_llama_dir, tmp_path, method, pattern):
    from prunekit.cli import main

    single = tmp_path / "single"
    assert main(prune_args(tiny_llama_dir, single, method, pattern)) == 0
    run = launch(["-m", "prunekit", *prune_args(tiny_llama_dir, tmp_path / "dp", method, pattern)])
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone reports
    assert reports[0]["data_parallel"] == {"ranks": 2, "batches_per_rank": [2, 2]}
    a, b = load_file(str(single / "model.safetensors")), load_file(str(tmp_path / "dp" / "model.safetensors"))
    assert a.keys() == b.keys()
    pruned = [k for k in a if k.endswith("proj.weight")]
    assert pruned and all((b[k] == 0).float().mean() == 0.5 for k in pruned)  # the exact amount, every layer
    if method == "wanda":  # scores from merged norms, weights untouched: the very same model
        assert all(torch.equal(a[k], b[k]) for k in a)
        return
    # SparseGPT: the statistics are summed in another order, and its sequential updates amplify
    # the last bits (on SmolLM2 as much as reordering the batches in one process does); here
    # the first layers, fed identical inputs, agree to float tolerance and masks almost everywhere
    first = [k for k in pruned if ".layers.0.self_attn." in k]
    for k in first:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in pruned) / sum(a[k].numel() for k in pruned)
    assert differ < 0.01, differ


def test_what_is_not_data_parallel_stops_every_rank(tiny_llama_dir, tmp_path):
    run = launch(["-m", "prunekit", "prune", str(tiny_llama_dir), "--structure", "neurons", "--ratio", "0.25",
                  "--nsamples", "4", "--seqlen", "32", "--output", str(tmp_path / "s"), "--quiet"])
    assert run.returncode != 0 and run.stderr.count("a structure stage is not data-parallel yet") == 2
    assert not (tmp_path / "s").exists()
    run = launch(["-m", "prunekit", *prune_args(tiny_llama_dir, tmp_path / "few", "wanda", "unstructured")[:-6],
                  "--nsamples", "1", "--batch-size", "1", "--output", str(tmp_path / "few"), "--quiet"])
    assert run.returncode != 0 and "1 calibration batches cannot be shared by 2 ranks" in run.stderr
    assert not (tmp_path / "few").exists()


def test_ranks_that_disagree_raise_on_every_rank(tmp_path):
    script = tmp_path / "agree_check.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from prunekit.calibration import distributed\n"
        "dist.init_process_group('gloo')\n"
        "try:\n"
        "    distributed.agree(['layer', dist.get_rank()], 'the next layers to prune')\n"
        "except distributed.DistributedError as exc:\n"
        "    print(f'refused: {exc}', flush=True)\n"
        "distributed.agree('same', 'a value every rank shares')\n"
        "dist.barrier()\n"
        "print(f'agreed {dist.get_rank()}', flush=True)\n"
        "dist.destroy_process_group()\n")
    run = launch([str(script)])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("refused: the ranks disagree on the next layers to prune (rank 0: ['layer', 0], "
                            "rank 1: ['layer', 1])") == 2 and "agreed 0" in run.stdout and "agreed 1" in run.stdout
