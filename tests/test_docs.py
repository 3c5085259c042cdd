"""README stays true: its adapter-type table is the registry's own, row for row."""

from __future__ import annotations

from pathlib import Path

from scripts.support_table import support_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_adapter_table_is_the_registrys() -> None:
    table = support_table()
    assert table in README.read_text(encoding="utf-8"), "regenerate it: python scripts/support_table.py"
    assert table.count("merged, exact") >= 16  # LoRA and the types merged row block by row block
