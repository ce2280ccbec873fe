"""Print the bad-input cases of tests/test_bad_inputs.py as a Markdown table: case, exit
code, the message, and anything written. Runs each case in-process on a tiny random Llama
with the real SmolLM2 tokenizer, in a temporary directory.

    .venv/bin/python scripts/bad_input_table.py > bad_inputs.md
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from conftest import tiny_model
    from test_bad_inputs import CASES, prepare, snapshot

    from prunekit.cli import main as cli
    from prunekit.models.loading import load_model

    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _, tok, _ = load_model("default")
        model = tmp_path / "tiny-llama"
        tiny_model("llama", vocab=len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
        print("| # | case | command | exit | message | written |")
        print("|---|---|---|---|---|---|")
        for i, (case, argv, _) in enumerate(CASES, start=1):
            root = tmp_path / f"case{i}"
            places = prepare(root, model)
            before = snapshot(root)
            err = io.StringIO()
            args = [a.format(**places) for a in argv]
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = cli(args)
                except SystemExit as exc:
                    code = exc.code
            after = snapshot(root)
            written = sorted(set(after) - set(before)) + [k for k in before if after.get(k) != before[k]]
            line = next((ln for ln in err.getvalue().splitlines() if ln.startswith("prunekit")), "")
            shown = " ".join(a.replace(str(root), "D").replace(str(model), "M") for a in args)
            print(f"| {i} | {case} | `prunekit {shown}` | {code} | {line.replace('|', '/')} | "
                  f"{', '.join(written) or 'nothing'} |")


if __name__ == "__main__":
    main()
