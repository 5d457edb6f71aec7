"""The one Markdown table every benchmark prints when it is run on its own."""

from __future__ import annotations

COLUMNS = ["figure", "value", "unit", "reference", "reference_value", "ratio", "target", "passed"]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
