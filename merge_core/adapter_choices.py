"""Which adapters one repo or folder holds, for the app's picker (PEFT's multi-adapter layout keeps
each adapter in a subfolder with its own adapter_config.json; ``save_pretrained`` puts "default" at
the top level and the others in subfolders named after them).

Listing is a convenience beside the merge, never a gate: an ID that cannot be listed (missing, gated,
misspelt, a local folder this app may not read) gives no choices, and the merge says why in its own
sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapter import ADAPTER_CONFIG, local_adapter_subfolders
from .errors import MergeError
from .frontend import LocalPaths
from .hub import HubClient
from .hub_files import adapter_subfolders
from .hub_ids import RepoRef, parse_source
from .inputs import parse_adapter_list


@dataclass(frozen=True)
class AdapterChoices:
    """(label, adapter ID) pairs to pick from, and the one the field already names; empty: no picker."""

    choices: tuple[tuple[str, str], ...] = ()
    selected: str | None = None

    @property
    def ids(self) -> list[str]:
        return [value for _, value in self.choices]


NO_CHOICES = AdapterChoices()


def _choices(source: str, subfolders: list[str], *, at_root: bool, typed: str, suffix: str = "") -> AdapterChoices:
    """Subfolder adapters of ``source`` as IDs the adapter field takes; none when there are no subfolders
    (a single adapter at the top level needs no picking)."""
    if not subfolders:
        return NO_CHOICES
    root = [(f"{source} (top level)", source + suffix)] if at_root else []
    pairs = tuple(root + [(sub, f"{source}/{sub}{suffix}") for sub in subfolders])
    selected = typed if typed in {value for _, value in pairs} else None
    return AdapterChoices(pairs, selected)


def _hub_choices(ref: RepoRef, spec: str, *, token: str | None, endpoint: str | None) -> AdapterChoices:
    _, files = HubClient(token, endpoint).resolve(RepoRef(ref.repo_id, ref.revision))
    suffix = "@" + spec.partition("@")[2] if "@" in spec else ""  # a revision typed in the ID stays in it
    return _choices(ref.repo_id, adapter_subfolders(files), at_root=ADAPTER_CONFIG in files, typed=spec, suffix=suffix)


def _local_choices(path: Path, spec: str) -> AdapterChoices:
    source = spec.rstrip("/")
    return _choices(source, local_adapter_subfolders(path), at_root=(path / ADAPTER_CONFIG).is_file(), typed=spec)


def discover_adapters(
    text: str | None,
    *,
    revision: str | None = None,
    token: str | None = None,
    local: LocalPaths,
    endpoint: str | None = None,
) -> AdapterChoices:
    """The adapters the adapter field's one entry holds in subfolders, on the Hub or in a local folder
    that ``local`` allows; nothing for several adapters, a weight, or an entry that cannot be listed."""
    try:
        entries = parse_adapter_list(text or "")
    except ValueError:
        return NO_CHOICES
    if len(entries) != 1 or entries[0][1] != 1.0:
        return NO_CHOICES
    spec = entries[0][0]
    try:
        source = parse_source(local.source(spec, "Adapter"), (revision or "").strip() or None)
        if isinstance(source, Path):
            return _local_choices(source, spec)
        return _hub_choices(source, spec, token=token, endpoint=endpoint)
    except (MergeError, ValueError, OSError):  # the merge explains these in its own sentence
        return NO_CHOICES
