"""``prunekit report RUN_DIR``: the HTML page and its PNGs from real saved results of a tiny
Llama (a weights stage, a structure stage), a hand-written report with a loss curve and budget
candidates, ``bench --output``, the errors, and a headless-Chromium screenshot of the page."""
from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import last_json, run_cli
from prunekit.errors import PrunekitError
from prunekit.report import write_report, write_report_files

LAYER = "model.layers.1.mlp.down_proj"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _prune(model: Path, out: Path, *flags: str) -> Path:
    from prunekit.cli import main

    code = main(["prune", str(model), *flags, "--output", str(out), "--nsamples", "4", "--seqlen", "64",
                 "--device", "cpu", "--quiet", "--json"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Saved results of the tiny Llama: OWL-allocated Wanda (layers differ in sparsity) and FLAP
    neurons, evaluated (``--eval`` writes prunekit_eval.json)."""
    root = tmp_path_factory.mktemp("report-runs")
    return {"weights": _prune(tiny_llama_dir, root / "weights", "--sparsity", "0.5", "--method", "wanda",
                              "--allocation", "owl"),
            "structure": _prune(tiny_llama_dir, root / "structure", "--structure", "neurons", "--ratio", "0.25",
                                "--eval", "default", "--eval-max-tokens", "128")}


def _copy(src: Path, dest: Path) -> Path:
    """A run directory without its 25 MB of weights (the report reads only JSON and YAML from it)."""
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix in (".json", ".yaml"):
            shutil.copy(f, dest / f.name)
    return dest


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29]), "IHDR CRC mismatch"
    return struct.unpack(">II", body[:8])


def _row(html: str, first_cell: str) -> str:
    """The table row whose first cell is ``first_cell``."""
    m = re.search(rf"<tr[^>]*><td>{re.escape(first_cell)}</td>.*?</tr>", html)
    assert m, f"no table row for {first_cell}"
    return m.group(0)


def _self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources
    assert "<link" not in html and "<script" not in html and "url(" not in html


def test_weights_run(runs, tmp_path):
    run = _copy(runs["weights"], tmp_path / "run")
    page, pngs = write_report_files(run)
    assert page == run / "prunekit_report.html" and [p.name for p in pngs] == ["prunekit_report_sparsity.png"]
    html = page.read_text(encoding="utf-8")
    report = json.loads((run / "prunekit_report.json").read_text())
    sparsity = report["layers"][LAYER]["sparsity"]
    other = report["layers"]["model.layers.0.mlp.down_proj"]["sparsity"]
    assert sparsity != other  # OWL: the check below tells the two layers apart
    assert f"{sparsity:.2%}" in _row(html, LAYER) and f"{other:.2%}" not in _row(html, LAYER)
    assert f"{report['params_total']:,}" in html and f"{report['params_nonzero']:,}" in html
    assert f"{report['sparsity']:.2%}" in html
    assert "prunekit prune ... --eval TEXT" in html  # no prunekit_eval.json: how to get one
    assert f"--output {run / 'prunekit_bench.json'}" in html  # no bench file: how to make it
    assert "method: wanda" in html and "allocation: owl" in html  # the recipe, verbatim
    width, height = png_size(pngs[0].read_bytes())
    assert width == 1200 and height == 360
    _self_contained(html)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert [base64.b64decode(e) for e in embedded] == [pngs[0].read_bytes()]
    assert not list(run.glob(".*tmp*"))  # no temporary file left behind


def test_structure_run_widths_and_disk_size(runs):
    run = runs["structure"]
    page = write_report(run, output=run / "custom.html")
    html = page.read_text(encoding="utf-8")
    assert (run / "custom_widths.png").is_file() and not (run / "custom_sparsity.png").exists()
    png_size((run / "custom_widths.png").read_bytes())
    report = json.loads((run / "prunekit_report.json").read_text())
    group = report["groups"][0]
    row = _row(html, group["name"])
    after = group["units_before"] - group["removed"]
    assert re.search(rf">{group['units_before']}<.*>{group['removed']}<.*>{after}<", row), row
    size = (run / "model.safetensors").stat().st_size
    assert f"{size:,} bytes" in html and "checkpoint format" in html
    assert f"{report['stages'][0]['macs_before']:,}" in html and f"{report['macs_after']:,}" in html
    evaluation = json.loads((run / "prunekit_eval.json").read_text())
    before, after = evaluation["perplexity_before"], evaluation["perplexity"]
    assert evaluation["tokens"] == 128 and before > 1e4  # a random model: about the vocabulary size
    assert f"perplexity {before:,.0f} → <b>{after:,.0f}</b> ({after / before:.3f}×)" in html
    assert "prunekit prune ... --eval TEXT" not in html


def _handwritten(root: Path, name: str = "<script>alert(1)</script>") -> Path:
    """A report as a recovery stage with a distillation loss curve and a budget stage write it."""
    root.mkdir()
    steps = [0, 10, 20, 30]
    stages = [
        {"stage": 1, "kind": "budget", "params_before": 1000, "params_after": 800, "nonzero_before": 1000,
         "nonzero_after": 800, "sparsity": 0.0, "seconds": 1.5, "structures": "neurons,heads",
         "candidates": [{"neurons": 0.25, "heads": 0.0, "params": 810, "loss": 4.25, "chosen": False},
                        {"neurons": 0.125, "heads": 0.5, "params": 799, "loss": 3.875, "chosen": True}]},
        {"stage": 2, "kind": "recovery", "params_before": 800, "params_after": 800, "nonzero_before": 800,
         "nonzero_after": 800, "sparsity": 0.0, "seconds": 9.0, "method": "distill", "steps": 30,
         "loss_curve": {"step": steps, "loss": [5.0, 3.0, 2.5, 2.25], "kl": [2.0, 1.0, 0.75, 0.5]}},
        {"stage": 3, "kind": "recovery", "params_before": 800, "params_after": 800, "nonzero_before": 800,
         "nonzero_after": 800, "sparsity": 0.0, "seconds": 2.0, "loss_curve": {"hidden": [0.5, 0.25]}},
        {"stage": 4, "kind": "recovery", "params_before": 800, "params_after": 800, "nonzero_before": 800,
         "nonzero_after": 800, "sparsity": 0.0, "seconds": 2.0},  # no curve: an older report
    ]
    report = {**stages[-1], "params_total": 800, "params_nonzero": 800, "model": name, "stages": stages}
    (root / "prunekit_report.json").write_text(json.dumps(report))
    (root / "prunekit_eval.json").write_text(json.dumps({
        "eval": "default", "tokens": 4096, "perplexity_before": 20.0, "perplexity": 25.0,
        "zero_shot": {"boolq": {"acc": 0.625, "acc_norm": 0.5}, "rte": {"acc": 0.5312}}}))
    return root


def test_loss_curve_candidates_eval_and_escaping(tmp_path):
    run = _handwritten(tmp_path / "hand")
    page, pngs = write_report_files(run)
    assert [p.name for p in pngs] == ["prunekit_report_loss.png"]
    assert png_size(pngs[0].read_bytes())[0] == 1200
    html = page.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    chosen = re.search(r'<tr class="chosen">.*?</tr>', html).group(0)
    assert "0.125" in chosen and "799" in chosen and "3.875" in chosen and "810" not in chosen
    assert html.count('<tr class="chosen">') == 1
    assert "loss: 5 → 2.25; kl: 2 → 0.5" in html and "hidden: 0.5 → 0.25" in html
    assert "perplexity 20 → <b>25</b> (1.250×)" in html
    assert "0.625" in _row(html, "boolq") and "0.5312" in _row(html, "rte")
    assert "4,096" in html
    assert "weights on disk" in html and "no weights file" in html
    _self_contained(html)
    elsewhere = tmp_path / "pages"
    elsewhere.mkdir()
    assert write_report(run, output=elsewhere) == elsewhere / "prunekit_report.html"  # a directory: the usual name
    assert sorted(p.name for p in elsewhere.iterdir()) == ["prunekit_report.html", "prunekit_report_loss.png"]


def _listing(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_errors_write_nothing(runs, tmp_path, capsys):
    run = _copy(runs["weights"], tmp_path / "run")
    bad_report = _copy(runs["weights"], tmp_path / "bad_report")
    (bad_report / "prunekit_report.json").write_text('{"params_total": 1,')
    bad_eval = _copy(runs["weights"], tmp_path / "bad_eval")
    (bad_eval / "prunekit_eval.json").write_text("[1, 2")
    bad_bench = tmp_path / "bench.json"
    bad_bench.write_text("not json")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "missing"], "does not exist"),
        ([tmp_path / "file"], "is a file, not a run directory"),
        ([tmp_path / "empty"], "no prunekit_report.json"),
        ([run, "--output", tmp_path / "nowhere" / "r.html"], "does not exist"),
        ([bad_report], f"{bad_report / 'prunekit_report.json'} is not valid JSON"),
        ([bad_eval], f"{bad_eval / 'prunekit_eval.json'} is not valid JSON"),
        ([run, "--bench", bad_bench], f"{bad_bench} is not valid JSON"),
        ([run, "--bench", tmp_path / "no-bench.json"], "does not exist"),
    ]
    before = _listing(tmp_path)
    for argv, message in cases:
        code, out, err = run_cli(capsys, "report", *argv)
        assert code == 2 and message in err and out == "", (argv, err)
    code, _, err = run_cli(capsys, "report", tmp_path / "empty")
    assert "made by `prunekit prune ... --output DIR`" in err
    assert _listing(tmp_path) == before


def test_missing_matplotlib_is_named(runs, tmp_path, monkeypatch):
    import sys

    run = _copy(runs["weights"], tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PrunekitError, match="pip install matplotlib"):
        write_report(run)
    assert not list(run.glob("*.html")) and not list(run.glob("*.png"))


def test_bench_output_then_report(runs, tiny_llama_dir, tmp_path, capsys):
    run = _copy(runs["structure"], tmp_path / "run")
    shutil.copy(runs["structure"] / "model.safetensors", run)
    bench_file = run / "prunekit_bench.json"
    code, out, err = run_cli(capsys, "bench", tiny_llama_dir, run, "--device", "cpu", "--repeats", "1",
                             "--prompt-tokens", "8", "--decode-tokens", "2", "--batch", "1", "--no-peak-memory",
                             "--quiet", "--json", "--output", bench_file)
    assert code == 0, err
    assert json.loads(bench_file.read_text()) == last_json(out)  # the file is the object --json prints
    code, out, err = run_cli(capsys, "report", run, "--json", "--quiet")
    assert code == 0, err
    result = last_json(out)
    assert result["output"] == str(run / "prunekit_report.html")
    assert [Path(p).name for p in result["pngs"]] == ["prunekit_report_widths.png", "prunekit_report_latency.png"]
    html = (run / "prunekit_report.html").read_text(encoding="utf-8")
    rows = json.loads(bench_file.read_text())["models"]
    assert f"{rows[1]['params_total']:,}" in _row(html, str(run))
    assert _row(html, str(run)).startswith('<tr class="this">')  # the run itself stands out
    assert f"({rows[1]['prefill_vs_first']:.2f}×)" in _row(html, str(run))
    code, _, err = run_cli(capsys, "bench", tiny_llama_dir, "--quiet", "--output", tmp_path / "no" / "b.json")
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists()


def _browser() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_screenshot(runs, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (scripts/setup.sh installs chromium)")
    run = _copy(runs["weights"], tmp_path / "run")
    page = write_report(run)
    shot = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                           f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=60)
    assert shot.is_file(), done.stderr[-2000:]
    assert png_size(shot.read_bytes()) == (1200, 2400)
    from matplotlib.image import imread

    pixels = imread(shot)[:, :, :3]  # (2400, 1200, 3) floats in [0, 1]
    assert pixels.shape == (2400, 1200, 3)
    colours = np.unique((pixels[::8, ::8] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 10  # text, tables and the chart drew, not a blank page
    bars = np.abs(pixels * 255 - np.array([0x3B, 0x6E, 0xA8])).max(axis=2) < 10  # the sparsity bars' colour
    assert bars.sum() > 2000, "the sparsity chart is not on the first screen"
