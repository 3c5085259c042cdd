"""Hub IO: resolve IDs, read metadata before downloading, download what a merge needs, push.

Every call goes through one ``HfApi(endpoint=..., token=...)`` so the endpoint and the
token are explicit; the token is never logged, echoed or written anywhere by this module.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from .errors import (
    AdapterConfigError,
    BaseCheckpointError,
    HubError,
    HubNetworkError,
    PushError,
    RepoAccessError,
    RepoNotFound,
    RevisionNotFound,
)
from .progress import ProgressCallback, ProgressUpdate, no_progress

T = TypeVar("T")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template.*", "*.model", "*.tiktoken"]
BASE_SMALL_PATTERNS = ["config.json", "generation_config.json", "model.safetensors.index.json", "README.md",
                       "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "chat_template.*", "*.model", "*.tiktoken", "*.py", "preprocessor_config.json"]


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: Optional[str] = None
    subfolder: str = ""  # PEFT's multi-adapter layout keeps each adapter in a subfolder

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return self.repo_id + sub + (f"@{self.revision}" if self.revision else "")


def parse_source(text: str, revision: Optional[str] = None) -> RepoRef | Path:
    """A local folder if one exists at that path, else a Hub ID ``owner/name[@revision]``."""
    text = (text or "").strip()
    if not text:
        raise ValueError("Enter a Hub model ID like owner/name, or a local folder.")
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ValueError(f"{text} is not a folder.")
        return path
    if "@" in text:
        text, _, rev = text.partition("@")
        revision = revision or rev or None
    parts = text.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    if not _REPO_ID.match(repo_id) or ".." in text or repo_id.endswith((".", "-")):
        raise ValueError(f"{text!r} is neither a local folder nor a Hub model ID of the form owner/name.")
    return RepoRef(repo_id, (revision or "").strip() or None, subfolder)


class HubClient:
    def __init__(self, token: Optional[str] = None, endpoint: Optional[str] = None):
        from huggingface_hub import HfApi

        # token=False keeps huggingface_hub from sending a cached login or HF_TOKEN the
        # caller did not hand us (on a Space that would be the Space owner's secret).
        self._token: Any = token if token else False
        self.api = HfApi(endpoint=endpoint, token=self._token)
        self.endpoint = self.api.endpoint

    def __repr__(self) -> str:  # never show the token
        return f"HubClient(endpoint={self.endpoint!r}, token={'***' if self._token else None})"

    # --- errors ---------------------------------------------------------------------------------

    def _call(self, what: RepoRef | str, fn: Callable[[], T]) -> T:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        ref = what if isinstance(what, RepoRef) else RepoRef(what)
        try:
            return fn()
        except GatedRepoError as exc:
            raise RepoAccessError(
                f"{ref.repo_id} is a gated model. Open {self.endpoint}/{ref.repo_id}, accept its conditions with your "
                "account, then log in (or pass a token of that account with read access)."
            ) from exc
        except RepositoryNotFoundError as exc:
            hint = (" If it is private, log in with an account that can see it." if not self._token
                    else " If it is private, make sure your token's account has access to it.")
            raise RepoNotFound(f"Repository {ref.repo_id} was not found on {self.endpoint}. Check the spelling.{hint}") from exc
        except RevisionNotFoundError as exc:
            raise RevisionNotFound(
                f"Revision {ref.revision!r} does not exist in {ref.repo_id}. Use a branch, tag or commit of that repo (or leave it empty for main)."
            ) from exc
        except EntryNotFoundError as exc:
            raise HubError(f"A file is missing in {ref}: {exc}") from exc
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise RepoAccessError(
                    f"Access to {ref.repo_id} was refused ({status}). Log in, or use a token with access to it."
                ) from exc
            if status is not None and status >= 500:
                raise HubNetworkError(f"The Hub answered {status} for {ref.repo_id}; this is usually temporary, try again in a minute.") from exc
            raise HubError(f"The Hub refused the request for {ref.repo_id}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise HubNetworkError(f"Could not reach {self.endpoint} ({type(exc).__name__}). Check the connection and try again; nothing was written.") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("httpx", "httpcore", "httpx2", "httpcore2")):
                raise HubNetworkError(f"Could not reach {self.endpoint} ({type(exc).__name__}). Check the connection and try again; nothing was written.") from exc
            raise

    # --- reading --------------------------------------------------------------------------------

    def resolve(self, ref: RepoRef) -> tuple[str, dict[str, int]]:
        """The commit sha of the revision and {path: size} of every file in the repo."""
        info = self._call(ref, lambda: self.api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True))
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        if not sizes or any(s.size is None for s in (info.siblings or [])):
            tree = self._call(ref, lambda: list(self.api.list_repo_tree(ref.repo_id, revision=info.sha, recursive=True)))
            sizes = {f.path: int(getattr(f, "size", 0) or 0) for f in tree if getattr(f, "size", None) is not None}
        return str(info.sha), sizes

    def card_data(self, ref: RepoRef) -> dict[str, Any]:
        try:
            info = self._call(ref, lambda: self.api.model_info(ref.repo_id, revision=ref.revision))
        except HubError:
            return {}
        data = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
        if getattr(info, "pipeline_tag", None):
            data.setdefault("pipeline_tag", info.pipeline_tag)
        return data

    def download(self, ref: RepoRef, sha: str, files: Iterable[str], cache_dir: Optional[Path] = None,
                 progress: ProgressCallback = no_progress, total_bytes: int = 0) -> Path:
        from huggingface_hub import snapshot_download

        names = sorted(set(files))
        tqdm_class = _progress_tqdm(progress, f"download {ref.repo_id}", total_bytes) if total_bytes else None
        kwargs: dict[str, Any] = dict(repo_id=ref.repo_id, revision=sha, allow_patterns=names, token=self._token,
                                      endpoint=self.endpoint, cache_dir=str(cache_dir) if cache_dir else None)
        if tqdm_class is not None:
            kwargs["tqdm_class"] = tqdm_class
        path = self._call(ref, lambda: snapshot_download(**kwargs))
        return Path(path)

    def safetensors_headers(self, ref: RepoRef, sha: str) -> dict[str, dict[str, Any]]:
        """{shard: {tensor: (dtype, shape)}} from HTTP range reads of the headers, no weights."""
        meta = self._call(ref, lambda: self.api.get_safetensors_metadata(ref.repo_id, revision=sha))
        out: dict[str, dict[str, Any]] = {}
        for shard, file_meta in meta.files_metadata.items():
            out[shard] = {name: (t.dtype, tuple(t.shape), tuple(t.data_offsets)) for name, t in file_meta.tensors.items()}
        return out

    # --- writing --------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        if not self._token:
            raise PushError("Log in with your Hugging Face account (or paste a write token) to push the merged model.")
        try:
            return self._call("whoami", lambda: self.api.whoami())
        except RepoAccessError as exc:
            raise PushError("The Hub did not accept this token. Log in again or create a new token with write access.") from exc


def matching(files: Iterable[str], patterns: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in patterns)]


def _progress_tqdm(progress: ProgressCallback, stage: str, total: int):
    """A tqdm class that forwards snapshot_download's byte counts to our callback."""
    from tqdm.auto import tqdm

    state = {"done": 0}

    class ForwardingTqdm(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # A disabled tqdm skips most of its setup (no .unit), so remember what we need first.
            self._counts_bytes = kwargs.get("unit") == "B"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts_bytes and n:
                state["done"] += int(n)
                progress(ProgressUpdate(stage, min(state["done"], total), total, "B"))
            return super().update(n)

    return ForwardingTqdm


def pickle_only(files: Iterable[str]) -> bool:
    names = set(files)
    has_safe = any(f.endswith(".safetensors") and "/" not in f and not f.startswith("adapter_") for f in names)
    has_pickle = any(f.startswith("pytorch_model") and f.endswith((".bin", ".bin.index.json")) for f in names)
    return has_pickle and not has_safe


def base_weight_files(files: dict[str, int], ref: RepoRef) -> list[str]:
    if "model.safetensors.index.json" in files:
        return []  # listed by the index, read after the small files arrive
    if "model.safetensors" in files:
        return ["model.safetensors"]
    if pickle_only(files):
        raise BaseCheckpointError(
            f"{ref} only has pickle weights (pytorch_model*.bin). This tool streams safetensors and never executes "
            "pickles. Pick a revision with safetensors (Hub repos often have a 'Adding `safetensors` variant' pull "
            "request, e.g. revision refs/pr/1)."
        )
    raise BaseCheckpointError(f"{ref} has no model weights (model.safetensors or its index). Is it a transformers model repo?")


def adapter_files(files: dict[str, int], ref: RepoRef, subfolder: str = "") -> list[str]:
    subfolder = subfolder or ref.subfolder
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    if f"{prefix}adapter_config.json" not in files:
        subdirs = sorted({f[: -len("/adapter_config.json")] for f in files if f.endswith("/adapter_config.json")})
        if subdirs:
            raise AdapterConfigError(
                f"{ref} keeps its adapters in subfolders ({', '.join(subdirs)}); pick one by adding it to the ID, "
                f"e.g. {ref.repo_id}/{subdirs[0]}."
            )
        if "config.json" in files:
            raise AdapterConfigError(f"{ref} is a full model, not a LoRA adapter (no adapter_config.json). Did you swap base and adapter?")
        raise AdapterConfigError(f"{ref} has no adapter_config.json, so it is not a PEFT adapter repo.")
    if f"{prefix}adapter_model.safetensors" not in files and f"{prefix}adapter_model.bin" not in files:
        raise AdapterConfigError(f"{ref} has adapter_config.json but no adapter weights (adapter_model.safetensors).")
    local = {f[len(prefix):]: f for f in files if f.startswith(prefix)}
    return [local[f] for f in matching(local, ADAPTER_PATTERNS)]


def list_adapters(files: Iterable[str]) -> list[str]:
    """Every adapter in a repo: "" for one at the root, else the subfolder names."""
    return sorted(f[: -len("adapter_config.json")].rstrip("/") for f in files if f.endswith("adapter_config.json"))
