"""The GPU part of the app: the only code that ZeroGPU runs on a GPU (inside ``spaces.GPU``).

Everything here crosses into ZeroGPU's forked worker, so jobs are small picklable records.
"""

from __future__ import annotations

import spaces  # must come before anything that initialises CUDA (ZeroGPU)

# isort: split
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core import pipeline
from merge_core.pipeline import GenerationSettings, MergeResult

log = logging.getLogger("lora_merge_space")

GPU_BASE_SECONDS, GPU_SECONDS_PER_GB, GPU_MAX_SECONDS = 60, 8, 240
SPEED_TOKENS = 16  # new tokens per timed run: enough for a rate, short enough for a shared CPU


@dataclass(frozen=True)
class GpuJob:
    """What a ZeroGPU call needs (picklable: it crosses into the GPU worker)."""

    base_dir: Path
    adapter_dir: Path
    output_dir: Path
    settings: GenerationSettings | None
    merged_gb: float
    functional: str = "auto"


def gpu_seconds(job: GpuJob) -> int:
    """ZeroGPU reservation: loading base+adapter and the merged model dominates, so it grows with size."""
    return int(min(GPU_MAX_SECONDS, GPU_BASE_SECONDS + GPU_SECONDS_PER_GB * max(0.0, job.merged_gb)))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@spaces.GPU(duration=gpu_seconds)
def run_model_checks(job: GpuJob) -> pipeline.ModelChecks:
    return pipeline.model_checks(
        job.base_dir, job.adapter_dir, job.output_dir, job.settings, device=_device(), functional=job.functional
    )


@spaces.GPU(duration=gpu_seconds)
def run_speed(job: GpuJob) -> pipeline.SpeedComparison:
    settings = job.settings
    tokens = min(int(settings.max_new_tokens), SPEED_TOKENS) if settings else SPEED_TOKENS
    prompt = settings.prompt if settings else "Hello"
    return pipeline.measure(
        job.base_dir, job.adapter_dir, job.output_dir, prompt=prompt, new_tokens=tokens, device=_device()
    )


def run_checks(result: MergeResult, settings: GenerationSettings | None, functional: str) -> pipeline.ModelChecks:
    job = GpuJob(
        result.base_dir, result.adapter_dir, result.output_dir, settings, result.sizes()["merged_gb"], functional
    )
    checks = run_model_checks(job)
    if checks.sample is not None:  # both models fit and generate: time them too (merged vs separate)
        try:
            result.speed = run_speed(job)  # read by merge() below
        except Exception:  # a failed timing must not cost the merge its checks
            log.warning("speed comparison failed", exc_info=True)
    return checks
