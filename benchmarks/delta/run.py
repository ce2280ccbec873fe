"""Delta pruning and merging on real SmolLM2-135M, fine-tuned here on two real texts.

Two "tasks": the King James Bible (Debian ``bible-kjv-text``) and the Python 3.11
documentation sources (Debian ``python3.11-doc``). The base (the bundled default model) is
fine-tuned briefly on each, full-parameter; each text is split into train / validation / test
stretches that do not overlap. Then:

1. delta pruning of each fine-tune at drop 0.5 ... 0.99 with DARE, DAREx-q (q chosen on the
   validation stretch with :func:`prunekit.delta.choose_q`), magnitude and drop-without-rescale:
   perplexity on the fine-tune's own test stretch;
2. merging the two fine-tunes (plain average, task arithmetic λ = 1, TIES, DARE-TIES):
   perplexity on both tasks;
3. the streamed CLI merge (``prunekit merge ... --json``) in a fresh process: its peak memory
   beside the models' sizes and beside an in-memory merge of the same models; the compact
   delta's size and its bit-exact round trip (``prunekit delta --compact`` then ``--apply``);
4. when ``mergekit`` is installed, the same DARE-TIES merge through it and the difference.

Setup: ``apt-get install -y bible-kjv-text bible-kjv python3.11-doc``. Run:
``.venv/bin/python benchmarks/delta/run.py`` (about 30-40 min on 2 cores; fine-tunes are cached
under ``$PRUNEKIT_CACHE/bench-delta`` and reused). Writes ``benchmarks/results/delta.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prunekit.calibration.text import calibration_windows  # noqa: E402
from prunekit.delta import DeltaConfig, choose_q, merge, prune_delta  # noqa: E402
from prunekit.delta.ops import DELTA_METHODS  # noqa: E402
from prunekit.evaluate.perplexity import perplexity  # noqa: E402
from prunekit.models.loading import cache_root, resolve  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("benchmarks.delta")
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")


def task_texts() -> dict[str, str]:
    """The two tasks' texts, read from the Debian packages."""
    bible = subprocess.run(["bible", "-p", "/usr/lib", "gen1:1-rev22:21"], capture_output=True, text=True,
                           check=False).stdout
    if len(bible) < 1_000_000:
        sys.exit("the King James Bible is missing: apt-get install -y bible-kjv-text bible-kjv")
    docs = sorted(PYDOC.rglob("*.rst.txt")) if PYDOC.is_dir() else []
    if not docs:
        sys.exit("the Python documentation is missing: apt-get install -y python3.11-doc")
    return {"bible": bible, "pydocs": "\n\n".join(p.read_text(errors="replace") for p in docs)}


def splits(tokenizer, text: str, seqlen: int, val_tokens: int, test_tokens: int) -> dict[str, torch.Tensor]:
    """(tokens,) ids: train from the first 80%, validation and test from two later stretches."""
    ids = tokenizer(text[:3_000_000], return_tensors="pt", verbose=False).input_ids[0]
    cut = int(ids.numel() * 0.8)
    return {"train": ids[:cut], "val": ids[cut: cut + val_tokens],
            "test": ids[cut + val_tokens + seqlen: cut + val_tokens + seqlen + test_tokens]}


def finetune(base_dir: str, ids: torch.Tensor, out: Path, steps: int, seqlen: int, batch: int, lr: float) -> Path:
    """Full-parameter AdamW fine-tune of the base on random windows of ``ids``; cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    windows = calibration_windows(ids, steps * batch, seqlen, seed=1)  # (steps*batch, seqlen)
    t0 = time.perf_counter()
    for step in range(steps):
        x = windows[step * batch: (step + 1) * batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log.info("fine-tune %s step %d/%d loss %.3f (%.0f s)", out.name, step + 1, steps, float(loss),
                     time.perf_counter() - t0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    tmp.rename(out)
    return out


def state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


class Scorer:
    """Perplexity of a state dict on token stretches, through one resident model."""

    def __init__(self, base_dir: str, seqlen: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.seqlen = seqlen

    def __call__(self, state: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
        self.model.load_state_dict(state, strict=False)
        with torch.no_grad():
            return perplexity(self.model, ids, self.seqlen, progress=False).perplexity or math.inf


def run_cli(args: list[str]) -> dict:
    """A prunekit command in a fresh process (its peak memory is its own); the JSON line."""
    cmd = [sys.executable, "-m", "prunekit.cli", *args, "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


IN_MEMORY_MERGE = """
import json, sys, torch
from prunekit.evaluate.resources import peak_rss_mb
from safetensors.torch import load_file, save_file
base, *fts = [load_file(p + '/model.safetensors') for p in sys.argv[2:]]
out = {k: (v + sum(f[k] - v for f in fts) / len(fts)).contiguous() for k, v in base.items()}
save_file(out, sys.argv[1] + '/model.safetensors')
print(json.dumps({'peak_memory_mb': peak_rss_mb()}))
"""


def memory_and_compact(base: str, fts: dict[str, Path], work: Path) -> dict:
    """Peak memory of the streamed merge vs an in-memory one; compact delta size and round trip."""
    a, b = (str(p) for p in fts.values())
    streamed = run_cli(["merge", base, a, b, "--method", "dare_ties", "--output", str(work / "merged")])
    (work / "naive").mkdir()
    naive = subprocess.run([sys.executable, "-c", IN_MEMORY_MERGE, str(work / "naive"), base, a, b],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    naive_mb = json.loads(naive.stdout.strip().splitlines()[-1])["peak_memory_mb"]
    idle = subprocess.run([sys.executable, "-c", "import torch, prunekit.delta.stream, json; "
                           "from prunekit.evaluate.resources import peak_rss_mb; print(peak_rss_mb())"],
                          capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    model_mb = (Path(base) / "model.safetensors").stat().st_size / 2**20
    dense = run_cli(["delta", base, a, "--method", "dare", "--drop", "0.9", "--output", str(work / "dense")])
    compact = run_cli(["delta", base, a, "--method", "dare", "--drop", "0.9", "--compact",
                       "--output", str(work / "compact")])
    applied = run_cli(["delta", base, str(work / "compact"), "--apply", "--output", str(work / "applied")])
    same = (work / "dense" / "model.safetensors").read_bytes() == (work / "applied" / "model.safetensors").read_bytes()
    return {"model_mb": model_mb, "models_in_merge": 3, "streamed_merge_peak_mb": streamed["peak_memory_mb"],
            "streamed_merge_seconds": streamed["seconds"], "in_memory_merge_peak_mb": naive_mb,
            "python_torch_idle_mb": float(idle.stdout.strip()), "largest_tensor_mb": streamed["largest_tensor_mb"],
            "dense_bytes": dense["bytes_written"], "compact_bytes": compact["bytes_written"],
            "compact_kept_fraction": compact["kept_fraction"], "apply_bit_exact": same,
            "delta_seconds": dense["seconds"], "compact_seconds": compact["seconds"], "apply_seconds": applied["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per task")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-tokens", type=int, default=1024)
    ap.add_argument("--test-tokens", type=int, default=2048)
    ap.add_argument("--drops", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 0.99])
    ap.add_argument("--finetune-only", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="redo only part 3 into the saved JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    base = resolve("default")
    tok = AutoTokenizer.from_pretrained(base)
    data = {name: splits(tok, text, args.seqlen, args.val_tokens, args.test_tokens)
            for name, text in task_texts().items()}
    cache = cache_root() / "bench-delta"
    cache.mkdir(parents=True, exist_ok=True)
    fts = {name: finetune(base, d["train"], cache / f"ft-{name}-{args.steps}", args.steps, args.seqlen, args.batch,
                          args.lr) for name, d in data.items()}
    if args.finetune_only:
        return
    if args.memory_only:
        out = json.loads((RESULTS / "delta.json").read_text())
        with tempfile.TemporaryDirectory(dir=cache) as work:
            out["memory"] = memory_and_compact(base, fts, Path(work))
        (RESULTS / "delta.json").write_text(json.dumps(out, indent=1))
        (RESULTS / "delta.md").write_text(markdown(out))
        return
    score = Scorer(base, args.seqlen)
    base_sd = state_dict(base)
    ft_sd = {name: state_dict(str(p)) for name, p in fts.items()}
    ref = {"base": {t: score(base_sd, d["test"]) for t, d in data.items()}}
    for name, sd in ft_sd.items():
        ref[f"ft-{name}"] = {t: score(sd, d["test"]) for t, d in data.items()}
    log.info("references %s", ref)
    rows = []
    for name, sd in ft_sd.items():
        for drop in args.drops:
            for method in ("dare", "darex", "magnitude", "drop"):
                t0 = time.perf_counter()
                q = None
                if method == "darex":
                    q, _ = choose_q(base_sd, sd, drop, lambda s, n=name: score(s, data[n]["val"]), seed=0)
                pruned = prune_delta(base_sd, sd, DeltaConfig(method, drop, q, 0), progress=False)
                rows.append({"task": name, "method": method, "drop": drop, "q": q,
                             "ppl": score(pruned.state_dict, data[name]["test"]),
                             "kept_fraction": pruned.report["kept_fraction"],
                             "seconds": time.perf_counter() - t0})
                log.info("%s", rows[-1])
    merges = []
    for label, fields in (("average", {"method": "task_arithmetic"}),
                          ("task_arithmetic λ=1", {"method": "task_arithmetic", "weights": (1.0, 1.0)}),
                          ("ties (drop 0.8)", {"method": "ties"}), ("dare_ties (drop 0.9)", {"method": "dare_ties"}),
                          ("dare_ties (drop 0.5)", {"method": "dare_ties", "drop": 0.5})):
        m = merge(base_sd, list(ft_sd.values()), progress=False, **fields)
        merges.append({"merge": label, **{t: score(m.state_dict, d["test"]) for t, d in data.items()}})
        log.info("%s", merges[-1])
    with tempfile.TemporaryDirectory(dir=cache) as work:
        memory = memory_and_compact(base, fts, Path(work))
    log.info("memory %s", memory)
    out = {"benchmark": "delta", "date": time.strftime("%Y-%m-%d"), "args": vars(args),
           "methods": DELTA_METHODS.names(), "references": ref, "delta": rows, "merge": merges, "memory": memory}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delta.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "delta.md").write_text(markdown(out))
    plot(out, RESULTS / "delta.png")


def markdown(out: dict) -> str:
    ref, rows = out["references"], out["delta"]
    tasks = list(ref["base"])
    lines = [f"# Delta pruning and merging, SmolLM2-135M ({out['date']})", "",
             f"Fine-tunes: {out['args']['steps']} AdamW steps of {out['args']['batch']}×{out['args']['seqlen']} "
             f"tokens, lr {out['args']['lr']}. Test perplexity over {out['args']['test_tokens']} held-out tokens "
             "per task.", "", "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {m} | " + " | ".join(f"{v[t]:.2f}" for t in tasks) + " |" for m, v in ref.items()]
    drops = sorted({r["drop"] for r in rows})
    for task in tasks:
        lines += ["", f"**{task}** fine-tune, perplexity on its own test text (dense fine-tune "
                      f"{ref['ft-' + task][task]:.2f}, base {ref['base'][task]:.2f}):", "",
                  "| method | " + " | ".join(f"drop {d}" for d in drops) + " |", "|---|" + "---|" * len(drops)]
        for method in ("dare", "darex", "magnitude", "drop"):
            cells = []
            for d in drops:
                r = next(r for r in rows if r["task"] == task and r["method"] == method and r["drop"] == d)
                cells.append(f"{r['ppl']:.2f}" + (f" (q {r['q']:.3f})" if r["q"] else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Merging the two fine-tunes (perplexity on each task's test text):", "",
              "| merge | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {m['merge']} | " + " | ".join(f"{m[t]:.2f}" for t in tasks) + " |" for m in out["merge"]]
    mem = out["memory"]
    lines += ["", "Memory and files (fresh processes, whole-process peak RSS):", "",
              f"- streamed `prunekit merge` of base + 2 fine-tunes ({mem['models_in_merge']} × {mem['model_mb']:.0f} MB "
              f"fp32): peak {mem['streamed_merge_peak_mb']:.0f} MB in {mem['streamed_merge_seconds']:.1f} s; an "
              f"in-memory merge of the same models: {mem['in_memory_merge_peak_mb']:.0f} MB; Python + torch idle: "
              f"{mem['python_torch_idle_mb']:.0f} MB; largest tensor {mem['largest_tensor_mb']:.0f} MB",
              f"- DARE drop 0.9: dense directory {mem['dense_bytes'] / 2**20:.0f} MB, compact delta "
              f"{mem['compact_bytes'] / 2**20:.0f} MB ({mem['compact_bytes'] / mem['dense_bytes']:.2f}×); applying it "
              f"to the base reproduces the dense file bit for bit: {mem['apply_bit_exact']}"]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = list(out["references"]["base"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4))
    for ax, task in zip(axes, tasks):
        for method in ("dare", "darex", "magnitude", "drop"):
            pts = sorted((r["drop"], r["ppl"]) for r in out["delta"] if r["task"] == task and r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(out["references"][f"ft-{task}"][task], color="k", ls="--", label="dense fine-tune")
        ax.axhline(out["references"]["base"][task], color="grey", ls=":", label="base")
        ax.set(title=f"{task} fine-tune", xlabel="drop rate", ylabel="test perplexity", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
