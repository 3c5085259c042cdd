"""Messages for an adapter that does not fit the chosen base: name both models when they differ."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterBaseMismatchError, ShapeMismatchError, TargetModuleNotFoundError
from .tensor_names import similar_tensors


def same_model_name(a: str | None, b: str | None) -> bool | None:
    """None when either side is unknown; local paths compare by their last two components."""
    if not a or not b:
        return None

    def norm(s: str) -> str:
        return "/".join(Path(s.rstrip("/")).parts[-2:]).lower()

    return norm(a) == norm(b) or Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


@dataclass(frozen=True)
class Blame:
    """Who the adapter was made for and who was chosen: the context of every mismatch message."""

    declared: str | None
    chosen: str  # as shown: the name the user gave, else the folder
    chosen_name: str | None = None  # as compared: only a name the user gave (a temp folder says nothing)
    task_type: str | None = None

    @property
    def names_differ(self) -> bool:
        return same_model_name(self.declared, self.chosen_name) is False

    def who(self) -> str:
        return (
            f"The adapter was trained on {self.declared or 'an unnamed base'!r}; you chose {self.chosen!r} as the base."
        )

    def _advice(self) -> str:
        if self.names_differ:
            return f"{self.who()} Use the base model the adapter was made for."
        return "Check that the adapter belongs to this base model."

    def mismatch(self, message: str) -> ShapeMismatchError:
        if self.names_differ:
            return AdapterBaseMismatchError(f"{message} {self._advice()}")
        return ShapeMismatchError(f"{message} {self._advice()}")

    def not_found(self, module: str, tensor: str, known: list[str]) -> TargetModuleNotFoundError:
        similar = similar_tensors(module, known)
        hint = f" Similar base tensors: {', '.join(similar)}." if similar else ""
        message = f"The adapter changes {module!r}, but the base model has no tensor {tensor!r}.{hint}"
        if self.task_type and self.task_type != "CAUSAL_LM":
            message += f" The adapter is for task {self.task_type}, which needs another model head."
        return TargetModuleNotFoundError(f"{message} {self._advice()}")
