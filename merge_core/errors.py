"""Exceptions raised by merge_core.

Every message says what is wrong *and* what the user can do about it, because these
strings are shown verbatim in the web app and the CLI.
"""

from __future__ import annotations


class MergeError(Exception):
    """Base class of every error merge_core raises on purpose."""


# --- adapter -----------------------------------------------------------------------------


class AdapterConfigError(MergeError):
    """adapter_config.json is missing, unreadable or inconsistent with the weights."""


class UnsupportedAdapterError(MergeError):
    """The adapter uses a PEFT method or option this tool cannot merge exactly."""


class AdapterWeightsError(MergeError):
    """The adapter's weight file is missing, unsafe to load, or broken."""


class NonFiniteAdapterWeightsError(AdapterWeightsError):
    """The adapter holds NaN or Inf values: merging would poison the model."""


# --- base ------------------------------------------------------------------------------------


class BaseCheckpointError(MergeError):
    """The base model folder cannot be streamed (no safetensors, broken index, ...)."""


# --- adapter vs base -------------------------------------------------------------------------


class TargetModuleNotFoundError(MergeError):
    """The adapter changes a module that the base model does not have."""


class ShapeMismatchError(MergeError):
    """An adapter tensor does not fit the base tensor it modifies."""


class AdapterBaseMismatchError(ShapeMismatchError):
    """The adapter was evidently trained for another base model."""


# --- output -----------------------------------------------------------------------------------


class OutputExistsError(MergeError):
    """The output folder exists and overwriting was not requested."""


class InsufficientDiskError(MergeError):
    """Not enough free disk space for the download or the merged model."""


# --- hub ----------------------------------------------------------------------------------------


class HubError(MergeError):
    """Base class of errors talking to the Hugging Face Hub."""


class RepoNotFound(HubError):
    """The repository does not exist, or is private and the token cannot see it."""


class RepoAccessError(HubError):
    """The repository is gated or private and the token has no access."""


class RevisionNotFound(HubError):
    """The branch, tag or commit does not exist in the repository."""


class HubNetworkError(HubError):
    """The Hub could not be reached; trying again later may work."""


class PushError(HubError):
    """Creating the repository or committing the merged model failed."""


# --- output safety and the operating system ----------------------------------------------------


class UnsafeOutputError(MergeError):
    """The output location is, contains or lies inside an input: writing there would destroy it."""


class OutputWriteError(MergeError):
    """The operating system refused to write the output (disk full, permissions, name too long)."""


class NonFiniteOutputError(MergeError):
    """The merged weights overflow the output dtype (Inf) or are NaN."""


class InvalidOptionError(MergeError, ValueError):
    """An option has a value this tool cannot use (shard size, device, dtype, ...)."""


_OS_ERROR_ADVICE = {
    "ENOSPC": "the disk is full; free some space or choose a folder on another disk",
    "EDQUOT": "the disk quota is exhausted; free some space or choose a folder on another disk",
    "EACCES": "permission denied; choose a folder you can write to",
    "EPERM": "the operation is not permitted; choose a folder you can write to",
    "EROFS": "the filesystem is read-only; choose a folder on a writable disk",
    "ENAMETOOLONG": "a name is too long for the filesystem; choose a shorter name",
    "ENOTDIR": "a part of the path is a file, not a folder; choose another path",
    "EISDIR": "a folder is in the way of a file; choose another path",
    "ENOENT": "the path does not exist; check it",
    "EEXIST": "something already exists there; choose another path",
    "EMFILE": "too many open files; close other programs and try again",
    "EFBIG": "a file would be larger than this filesystem or a file-size limit allows; choose a folder on another disk",
}


def explain_os_error(exc: OSError, action: str, path: object) -> str:
    """One sentence for an OSError: what failed, where, and what to do."""
    import errno

    code = errno.errorcode.get(exc.errno or 0, "")
    detail = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ERROR_ADVICE.get(code, f"{detail}; check the path and try again")
    where = str(path)
    if len(where) > 160:
        where = where[:80] + "…" + where[-60:]
    return f"Could not {action} {where}: {advice}."


# --- verification models -------------------------------------------------------------------------


class ModelLoadError(MergeError):
    """transformers or PEFT could not load the base+adapter or the merged model for the function checks."""


# --- quantized bases ----------------------------------------------------------------------------


class UnsupportedQuantizationError(BaseCheckpointError):
    """The base is quantized in a format this tool cannot dequantize exactly (GPTQ, AWQ, ...)."""


class QuantizationStateError(BaseCheckpointError):
    """A quantized base's side tensors (scales, absmax, quant state) are missing or inconsistent."""


# --- which modules an adapter targets -----------------------------------------------------------


class AdapterTargetError(AdapterConfigError):
    """PEFT would refuse the adapter's targeting (no module matched, no default targets, unsupported layer)."""


# --- GGUF export --------------------------------------------------------------------------------


class GgufError(MergeError):
    """The merged model could not be written as GGUF."""


class GgufUnsupportedError(GgufError):
    """The architecture, quantization type or rope scaling has no exact GGUF form here."""


class GgufTokenizerError(GgufError):
    """The tokenizer cannot be described in GGUF metadata (missing, not BPE, unknown split rule)."""


# --- streamed push ------------------------------------------------------------------------------


class DiskBudgetError(InsufficientDiskError):
    """The streamed Hub-to-Hub pipeline cannot fit its disk budget; ``needed`` and ``budget`` are bytes."""

    def __init__(self, message: str, *, needed: int, budget: int) -> None:
        super().__init__(message)
        self.needed, self.budget = needed, budget


class StreamVerificationError(PushError):
    """A streamed push's verification failed, so nothing was committed; ``report`` holds the table."""

    def __init__(self, message: str, *, report: object) -> None:
        super().__init__(message)
        self.report = report
