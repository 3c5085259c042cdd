"""merge_core: stream a LoRA adapter into its base model, exactly, shard by shard."""

from . import quiet  # noqa: F401 - first, before anything imports bitsandbytes
from .errors import *  # noqa: F403 - the exception classes are part of the public API
from .merge import execute_plan, merge_adapter
from .plan import MergeOptions, MergePlan, build_plan, parse_size
from .progress import ProgressCallback, ProgressUpdate, TqdmProgress, no_progress
from .report import MergeReport, ModuleReport

__version__ = "0.1.0"

__all__ = [
    "MergeOptions",
    "MergePlan",
    "MergeReport",
    "ModuleReport",
    "ProgressCallback",
    "ProgressUpdate",
    "TqdmProgress",
    "build_plan",
    "execute_plan",
    "merge_adapter",
    "no_progress",
    "parse_size",
]
