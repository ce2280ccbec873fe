"""``prunekit report RUN_DIR``: one self-contained HTML page about a saved result.

A saved result (``prunekit prune/run --output DIR``) holds its recipe and report; this module
reads them, with the optional ``prunekit_eval.json`` (quality before and after) and
``prunekit_bench.json`` (what ``prunekit bench ... --output`` wrote), and writes one HTML page
whose charts are embedded as data URIs (the page opens anywhere, alone), plus the same charts
as PNG files beside it (``{page stem}_sparsity.png`` and so on; named after the page so two
pages in one directory keep their own). Every input is read and every chart drawn before the
first byte is written; each file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import clean_stale
from .errors import ModelLoadError, OutputError

REPORT_FILE = "prunekit_report.json"  # as prunekit.export.save writes it (that module imports torch)
RECIPE_FILE = "prunekit_recipe.yaml"
EVAL_FILE = "prunekit_eval.json"
BENCH_FILE = "prunekit_bench.json"
HTML_FILE = "prunekit_report.html"
#: chart name -> what it shows (the PNG is ``{stem}_{name}.png``)
CHARTS = {"sparsity": "per-layer sparsity", "widths": "per-group widths", "loss": "loss curve",
          "latency": "latency"}


@dataclass(frozen=True)
class Run:
    """Everything a report shows about one saved result."""

    path: Path
    report: dict[str, Any]
    recipe: str | None
    config: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    bench: dict[str, Any] | None
    bench_file: Path | None

    @property
    def stages(self) -> list[dict[str, Any]]:
        """One report per stage (a result of an early version, with no ``stages``, is its own one stage)."""
        stages = self.report.get("stages")
        if isinstance(stages, list):  # with the stages of the results this one continued, first
            earlier = self.report.get("previous_stages")
            earlier = earlier if isinstance(earlier, list) else []
            return [s for s in (*earlier, *stages) if isinstance(s, dict)]
        return [self.report] if "kind" in self.report else []


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); {what}") from None


def _object(path: Path, what: str) -> dict[str, Any]:
    value = _json(path, what)
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, expected an object; {what}")
    return value


def load_run(run_dir: str | Path, bench: str | Path | None = None) -> Run:
    """Read a saved result directory; ``bench``: a ``prunekit bench --json`` file to use instead
    of ``RUN_DIR/prunekit_bench.json``."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise ModelLoadError(f"run directory {path} does not exist; give the --output DIR of a "
                             "`prunekit prune` or `prunekit run`")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a run directory; give the --output DIR of a "
                             "`prunekit prune` or `prunekit run`")
    report_file = path / REPORT_FILE
    if not report_file.is_file():
        raise ModelLoadError(f"{path} has no {REPORT_FILE}, so it is not a saved prunekit result; that file is "
                             "made by `prunekit prune ... --output DIR` or `prunekit run RECIPE MODEL --output DIR`")
    report = _object(report_file, "save the result again with `prunekit prune/run --output`")
    recipe_file = path / RECIPE_FILE
    recipe = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else None
    config_file = path / "config.json"
    config = _object(config_file, "the model's config is corrupt") if config_file.is_file() else None
    eval_file = path / EVAL_FILE
    evaluation = _object(eval_file, "delete it or evaluate again") if eval_file.is_file() else None
    if bench is not None:
        bench_file: Path | None = Path(bench).expanduser()
        if not bench_file.is_file():
            raise ModelLoadError(f"--bench {bench_file} does not exist; write it with `prunekit bench MODEL "
                                 f"{path} --output {bench_file}`")
    else:
        bench_file = path / BENCH_FILE if (path / BENCH_FILE).is_file() else None
    bench_data = _object(bench_file, "write it again with `prunekit bench ... --output FILE`") if bench_file else None
    return Run(path, report, recipe, config, evaluation, bench_data, bench_file)


def output_path(run_dir: Path, output: str | Path | None) -> Path:
    """Where the page goes: ``output`` (a file, or an existing directory to put
    ``prunekit_report.html`` in), by default ``RUN_DIR/prunekit_report.html``."""
    if output is None:
        return run_dir / HTML_FILE
    out = Path(output).expanduser()
    if out.is_dir():
        return out / HTML_FILE
    if not out.parent.is_dir():
        what = "is a file" if out.parent.exists() else "does not exist"
        raise OutputError(f"cannot write {out}: its directory {out.parent} {what}; create it first or choose "
                          "another --output")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"cannot write {out}: permission denied in {out.parent}")
    return out


def _write_bytes_atomically(dest: Path, data: bytes) -> None:
    clean_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def charts(run: Run) -> dict[str, bytes]:
    """Every chart the run has data for, as PNG bytes."""
    from .report_plots import latency_png, loss_png, sparsity_png, widths_png

    drawn = {"sparsity": sparsity_png(run.stages), "widths": widths_png(run.stages), "loss": loss_png(run.stages),
             "latency": latency_png(run.bench) if run.bench else None}
    return {k: v for k, v in drawn.items() if v is not None}


def render(run_dir: str | Path, output: str | Path | None = None,
           bench: str | Path | None = None) -> tuple[Path, str, dict[Path, bytes]]:
    """Read, check and draw everything, writing nothing: (page path, page HTML, {PNG path: bytes})."""
    from .report_html import page
    from .report_plots import require_matplotlib

    run = load_run(run_dir, bench)
    out = output_path(run.path, output)
    require_matplotlib()
    drawn = charts(run)
    html = page(run, drawn)
    return out, html, {out.with_name(f"{out.stem}_{name}.png"): png for name, png in drawn.items()}


def write_report_files(run_dir: str | Path, output: str | Path | None = None,
                       bench: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write the page and its PNGs; (page, PNGs). Nothing is written when any input is bad."""
    out, html, pngs = render(run_dir, output, bench)
    for path, data in pngs.items():
        _write_bytes_atomically(path, data)
    _write_bytes_atomically(out, html.encode("utf-8"))
    return out, list(pngs)


def write_report(run_dir: str | Path, output: str | Path | None = None, bench: str | Path | None = None) -> Path:
    """Write one self-contained HTML page about the saved result ``run_dir`` (default
    ``RUN_DIR/prunekit_report.html``) and its charts as PNGs beside it; returns the page's path.
    ``bench``: a ``prunekit bench --json`` file (default ``RUN_DIR/prunekit_bench.json`` when present)."""
    return write_report_files(run_dir, output, bench)[0]


__all__ = ["Run", "load_run", "render", "write_report", "write_report_files"]
