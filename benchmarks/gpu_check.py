#!/usr/bin/env python3
"""On a machine with CUDA: tiny merges on cpu and on cuda give the same bytes, and the CLI's
`--device cuda --verify` passes. Builds its tiny models (tests/factories.py); downloads nothing.

    python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from merge_core.merge import merge_adapter  # noqa: E402
from merge_core.options import MergeOptions  # noqa: E402
from tests.factories import make_adapter, make_base  # noqa: E402


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_on_both(root: Path, dtype: torch.dtype) -> bool:
    base = make_base(root / f"base-{dtype}", dtype=dtype, max_shard_size="200KB")
    adapter = make_adapter(base, root / f"adapter-{dtype}", use_dora=dtype == torch.float32)
    merged = {}
    for device in ("cpu", "cuda"):
        merge_adapter(base, adapter, root / f"out-{dtype}-{device}", MergeOptions(device=device))
        merged[device] = _tensors(root / f"out-{dtype}-{device}")
    cpu, cuda = merged["cpu"], merged["cuda"]
    return cpu.keys() == cuda.keys() and all(torch.equal(cpu[k], cuda[k]) for k in cpu)


def main() -> None:
    print("cuda", torch.cuda.is_available(), torch.__version__)
    root = Path(tempfile.mkdtemp())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        same = _same_on_both(root, dtype)
        print(f"{dtype}: cpu == cuda bitwise: {same}")
        assert same
    base, adapter = root / f"base-{torch.bfloat16}", root / f"adapter-{torch.bfloat16}"
    cmd = [sys.executable, "-m", "merge_core.cli", str(base), str(adapter), str(root / "cli")]
    run = subprocess.run([*cmd, "--device", "cuda", "--verify"], capture_output=True, text=True, cwd=REPO)
    print("cli exit", run.returncode, run.stdout[-2000:])
    assert run.returncode == 0, run.stderr[-3000:]


if __name__ == "__main__":
    main()
