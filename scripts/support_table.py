#!/usr/bin/env python3
"""Print README's adapter-type table from merge_core.peft_types' registry (tests/test_docs.py keeps them equal)."""

from __future__ import annotations


def support_table() -> str:
    from merge_core.peft_types import peft_type_support

    rows = ["| PEFT type | merged? | how, or why not |", "|---|---|---|"]
    for peft_type, status, reason in peft_type_support():
        mark = "merged, exact" if status == "merged" else "refused"
        rows.append(f"| `{peft_type}` | {mark} | {reason} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(support_table())
