"""What every benchmark shares when it is run on its own: its command line and the one
Markdown table it prints."""

from __future__ import annotations

import argparse
from pathlib import Path

COLUMNS = ["figure", "value", "unit", "reference", "reference_value", "ratio", "target", "passed"]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def bench_parser(doc: str, default_workdir: Path, quick_help: str, workdir_help: str | None = None
                 ) -> argparse.ArgumentParser:
    """`--quick` and `--workdir`, the options every benchmark takes; a caller may add its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--workdir", type=Path, default=default_workdir, help=workdir_help)
    return parser
