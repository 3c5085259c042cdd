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
