"""The verification table as data: rows of checks, rendered as text, JSON or a DataFrame."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Check:
    name: str
    group: str  # "structure" | "numerics" | "function"
    passed: bool | None  # None: skipped, with the reason in detail
    value: str
    threshold: str
    detail: str = ""

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else ("pass" if self.passed else "FAIL")


@dataclass
class ModuleNumerics:
    tensor: str
    variant: str
    bitwise_fraction: float  # share of elements equal to round(float64 reference)
    relative_error: float  # ||W'_written - ref|| / ||ref||
    probe_error: float  # ||W'x - (Wx + s B(Ax))|| / ||Wx + s B(Ax)||


@dataclass
class VerificationReport:
    checks: list[Check] = field(default_factory=list)
    modules: list[ModuleNumerics] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def rows(self) -> list[list[str]]:
        return [[c.group, c.name, c.value, c.threshold, c.status, c.detail] for c in self.checks]

    HEADERS = ["group", "check", "value", "threshold", "result", "detail"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [asdict(c) | {"status": c.status} for c in self.checks],
            "modules": [asdict(m) for m in self.modules],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        widths = [max(len(str(r[i])) for r in [self.HEADERS, *self.rows()]) for i in range(5)]
        lines = []
        for row in [self.HEADERS, *self.rows()]:
            cells = [str(v).ljust(w) for v, w in zip(row[:5], widths, strict=False)]
            lines.append("  ".join(cells) + (f"  {row[5]}" if row[5] else ""))
        lines.append(f"verification: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


# --- reading the merged checkpoint --------------------------------------------------------------
