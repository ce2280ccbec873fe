"""Markdown and plot of ``benchmarks/results/data_pruning.json`` (see ``run.py``), with the
verdicts on the published effects computed from the numbers, not written by hand."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

SCORES = ("el2n", "grand", "forgetting", "prototypes")
LABELLED = ("el2n", "grand", "forgetting")


def _ms(accs: list[float]) -> tuple[float, float]:
    return 100 * statistics.mean(accs), 100 * (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def _fmt(accs: list[float] | None) -> str:
    if not accs:
        return ""
    m, s = _ms(accs)
    return f"{m:.1f} ± {s:.1f}"


def _se_diff(a: list[float], b: list[float]) -> float:
    """Standard error (percentage points) of the difference of two means."""
    return math.sqrt(sum(_ms(v)[1] ** 2 / len(v) for v in (a, b)))


def _rows(out: dict, name: str) -> list[tuple[str, str]]:
    found = {tuple(k.split("|")[1:3]) for k in out["cells"] if k.startswith(name + "|")}
    order = [(m, d) for m in SCORES for d in ("hard", "easy")] + [("random", "-")]
    order += [(m, d) for m in ("el2n+kd", "random+kd") for d in ("hard", "easy", "-")]
    return [r for r in order if r in found]


def _removed(out: dict) -> list[float]:
    return sorted({float(k.split("|")[3]) for k in out["cells"]})


def _cell(out: dict, name: str, method: str, mode: str, r: float) -> list[float] | None:
    return out["cells"].get(f"{name}|{method}|{mode}|{r}")


def headline(out: dict) -> list[str]:
    """Per dataset and fraction removed: full set, random, the best keep-hard and keep-easy."""
    lines = ["| dataset | removed | full set | random | best keep-hard | best keep-easy |", "|---|---|---|---|---|---|"]
    for name, full in out["full"].items():
        for r in _removed(out):
            best = {}
            for mode in ("hard", "easy"):
                got = [(statistics.mean(c), m, c) for m in SCORES if (c := _cell(out, name, m, mode, r))]
                if got:
                    _, m, c = max(got)
                    best[mode] = f"{_fmt(c)} ({m})"
            rand = _cell(out, name, "random", "-", r)
            lines.append(f"| {name} | {r:.0%} | {_fmt(full)} | {_fmt(rand)} | {best.get('hard', '')} | "
                         f"{best.get('easy', '')} |")
    return lines


def tables(out: dict) -> list[str]:
    lines = []
    removed = _removed(out)
    for name, full in out["full"].items():
        lines += [f"### {name} (full training set: {_fmt(full)})", "",
                  "| score | keep | " + " | ".join(f"{r:.0%} removed" for r in removed) + " |",
                  "|---|---|" + "---|" * len(removed)]
        for method, mode in _rows(out, name):
            cells = [_fmt(_cell(out, name, method, mode, r)) for r in removed]
            lines.append(f"| {method} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def paul_verdict(out: dict) -> list[str]:
    """Paul et al. 2021: on CIFAR-10, EL2N / GraNd keep-hard remove half the data at no loss."""
    lines = []
    for name, full in out["full"].items():
        fm = _ms(full)[0]
        for r in (0.3, 0.5):
            got = [(statistics.mean(c), m, c) for m in ("el2n", "grand") if (c := _cell(out, name, m, "hard", r))]
            rand = _cell(out, name, "random", "-", r)
            if not got or not rand:
                continue
            _, m, c = max(got)
            gap, se = _ms(c)[0] - fm, _se_diff(c, full)
            vs = _ms(c)[0] - _ms(rand)[0]
            verdict = "no loss (within 2 SE)" if gap > -2 * se else "a loss"
            lines.append(f"- {name}, {r:.0%} removed: best of EL2N/GraNd keep-hard ({m}) is {gap:+.1f} pp from the "
                         f"full set (SE {se:.1f}): {verdict}; {vs:+.1f} pp against random.")
    return lines


def sorscher_verdict(out: dict) -> list[str]:
    """Sorscher et al. 2022: keep hard when data is abundant, easy when scarce (or pruned hard)."""
    lines = []
    for name in out["full"]:
        parts = []
        for r in _removed(out):
            diffs = [statistics.mean(h) - statistics.mean(e) for m in SCORES
                     if (h := _cell(out, name, m, "hard", r)) and (e := _cell(out, name, m, "easy", r))]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                parts.append(f"{r:.0%}: hard − easy {100 * statistics.mean(diffs):+.1f} pp (hard wins {wins}/"
                             f"{len(diffs)} scores)")
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts) + ".")
    return lines


def kd_verdict(out: dict) -> list[str]:
    lines = []
    for name in out["full"]:
        for r in _removed(out):
            pairs = [(m, d) for m, d in (("random", "-"), ("el2n", "hard"), ("el2n", "easy"))
                     if _cell(out, name, f"{m}+kd", d, r) and _cell(out, name, m, d, r)]
            if pairs:
                gain = {(m, d): _ms(_cell(out, name, m + "+kd", d, r))[0] - _ms(_cell(out, name, m, d, r))[0]
                        for m, d in pairs}
                gains = ", ".join(f"{m}{'' if d == '-' else ' keep ' + d}: {g:+.1f}" for (m, d), g in gain.items())
                lines.append(f"- {name}, {r:.0%} removed, distilled minus plain (pp): {gains}.")
    return lines


#: written for the 2026-12-02 run; the verdict lines below it are recomputed on every run
READING = """\
**Reading (2026-12-02 run).** *Paul et al.* (half of the data removed at no loss, keeping
the hard examples): it appears at equal steps on the two abundant sets (Fashion-MNIST 20k:
EL2N keep-hard at 50% removed 85.7 against 84.7 on the full set and 84.3 for random;
MNIST-1D 40k: GraNd 94.2 against 91.7), not at equal epochs (fewer steps cost 1.7-3.5 pp),
and not on the scarce set (-12.7 pp at 50%). On Fashion-MNIST it is no feat of the score:
random also loses under 1 pp up to 70% removed, the 20k set being redundant for this MLP.
*Sorscher et al.* (keep hard when data is abundant, easy when scarce): abundant MNIST-1D
keeps hard at every fraction (hard − easy +1.7 to +18 pp); on the scarce set and on
Fashion-MNIST the sign flips only at 70% removed (-5.7 and -3.8 pp), where random beats
every score, so the crossover appears, but as a function of the kept-set size (easy or
random once fewer than ~600 / ~6k examples remain) rather than keep-easy winning on scarce
data at every fraction. *Ben-Baruch et al.* (distillation helps pruned sets): at equal
epochs on Fashion-MNIST it helps most where the kept set is small and hard (EL2N keep-hard
at 70% removed +16.1 pp; random with distillation is the best cell there, 82.4 against 81.5
plain); at 10-50% it moves random and EL2N keep-hard by under 1 pp and EL2N keep-easy by
+0.9 to +2.9 pp. At this scale (MLP / small
CNN, 5-60 epochs, PCA prototypes) none of this says how CIFAR-10 or ImageNet behave.
"""

INTRO = {
    "steps": "equal steps: every pruned set trained for the optimizer steps of the full set",
    "epochs": "equal epochs: every pruned set trained for the full set's epochs (fewer steps)",
}


def _section(run: dict, protocol: str) -> list[str]:
    lines = [f"**Paul et al. 2021** (EL2N/GraNd keep-hard, CIFAR-10, ResNet-18, 200 epochs: half the data "
             "removed at no loss):", *paul_verdict(run), "",
             "**Sorscher et al. 2022** (keep hard when data is abundant, keep easy when it is scarce or when most "
             "of it is pruned):", *sorscher_verdict(run), ""]
    kd = kd_verdict(run)
    if kd:
        lines += ["**Ben-Baruch et al. 2024** (distillation from a full-data teacher helps pruned sets, most at "
                  "high pruning):", *kd, ""]
    return lines


def markdown(out: dict) -> str:
    runs = {p: out["protocols"][p] for p in INTRO if p in out.get("protocols", {})}
    if not runs:
        return "# Data pruning\n\nNo results yet.\n"
    first = next(iter(runs))
    date = max(r.get("date", "") for r in runs.values())
    seeds = runs[first].get("args", {}).get("seeds", 3)
    minutes = sum(r.get("seconds", 0) for r in runs.values()) / 60
    lines = [f"# Data pruning ({date})", "",
             f"Test accuracy %, mean ± std over {seeds} seeds (the scores are computed once, seed 0; the seeds "
             "vary the training of the pruned sets, and random's draw). Produced by `benchmarks/data/run.py`, whose "
             f"docstring gives the recipe (datasets, models, score settings); {minutes:.0f} min of single-thread "
             "compute in all, summed over processes. *keep hard*: the highest scores kept (the easy examples removed); *keep easy*: the "
             "opposite. Prototypes cluster a PCA embedding of the inputs (no self-supervised encoder is "
             "available offline). Protocols: " + "; ".join(f"*{p}*: {INTRO[p]}" for p in runs) + ".", "",
             f"## Headline ({INTRO[first].split(':')[0]})", "",
             "\"best\" is the best of the four scores in that mode, so it carries a selection bias in its favour "
             "against the single random row.", "", *headline(runs[first]), "",
             "## Published effects at this scale", "", READING, "Computed from the tables:", ""]
    for p, run in runs.items():
        lines += [f"### {INTRO[p]}", "", *_section(run, p)]
    lines += ["## All cells", ""]
    for p, run in runs.items():
        lines += [f"## {INTRO[p]}", "", *tables(run)]
        secs = run.get("score_seconds", {})
        if secs:
            lines += ["Scoring time (s, full training set, all runs): " +
                      ", ".join(f"{k.replace('|', ' ')} {v:g}" for k, v in secs.items()) + ".", ""]
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = {p: out["protocols"][p] for p in INTRO if p in out.get("protocols", {})}
    names = list(dict.fromkeys(n for r in runs.values() for n in r["full"]))
    if not names:
        return
    fig, axes = plt.subplots(len(runs), len(names), figsize=(5.2 * len(names), 4.2 * len(runs)), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(SCORES)} | {"random": "k", "el2n+kd": "C5", "random+kd": "C6"}
    for row, (protocol, run) in zip(axes, runs.items()):
        for ax, name in zip(row, names):
            if name not in run["full"]:
                ax.axis("off")
                continue
            for method, mode in _rows(run, name):
                pts = [(r, _ms(c)) for r in _removed(run) if (c := _cell(run, name, method, mode, r))]
                if not pts:
                    continue
                ax.errorbar([100 * r for r, _ in pts], [m for _, (m, _) in pts], yerr=[s for _, (_, s) in pts],
                            marker="o", ms=3, capsize=2, color=colours[method], ls="--" if mode == "easy" else "-",
                            label=method if mode == "-" else f"{method} keep {mode}")
            ax.axhline(_ms(run["full"][name])[0], color="grey", ls=":", label="full set")
            ax.set(title=f"{name} ({protocol.replace('steps', 'equal steps').replace('epochs', 'equal epochs')})",
                   xlabel="training set removed (%)", ylabel="test accuracy (%)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
