#!/usr/bin/env python3
"""The merge against `cp` of the same checkpoint, quiet and with busy neighbours, in one command.

    python benchmarks/merge_vs_cp.py --make 3B --work /work/bench [--rounds 3] [--threads auto,1] [--busy 0,2]

For each round, each busy level (that many `while True: pass` processes beside the runs) and each
math-thread setting: one merge (a subprocess: imports and planning untimed, then `execute_plan` and a
`sync`, timed) and one `cp -r BASE OUT && sync`, alternating, page cache warm, `sync` before each
run (untimed). Prints, per setting, merge and cp seconds (best and median), their ratio, the whole
merge process's wall time (imports and planning included), its peak RSS and the load average.
On a VM that reports free pages to its host, give --warm-memory (about the output's size) so cp, which
needs fresh page cache, does not pay for memory the run before it left idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_ENGINE = """
import json, os, sys, time
started = time.perf_counter()
from merge_core.merge import execute_plan
from merge_core.options import MergeOptions
from merge_core.plan import build_plan
plan = build_plan(sys.argv[1], sys.argv[2], MergeOptions(dtype=sys.argv[4], device=sys.argv[5]))
planned = time.perf_counter()
report = execute_plan(plan, sys.argv[3])
os.sync()
done = time.perf_counter()
import torch
try:
    from merge_core.threads import chosen_threads
    threads = chosen_threads()
except ImportError:  # an engine from before the thread rule (--before): torch's default
    threads = torch.get_num_threads()
print("RESULT " + json.dumps({"merge_s": done - planned, "startup_s": planned - started,
      "phases": report.seconds, "threads": threads}))
"""


@dataclass
class Row:
    busy: int
    threads: str
    merge_s: list[float] = field(default_factory=list)
    cp_s: list[float] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)
    used_threads: int = 0


def _warm(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass


_TOUCH = """
import mmap, sys
n, page = int(sys.argv[1]), b"\\1" * (64 << 20)
with mmap.mmap(-1, n) as m:
    for start in range(0, n - len(page) + 1, len(page)):
        m[start : start + len(page)] = page
"""


def _warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of anonymous memory, in a child (the runs' peak RSS stays theirs). On a VM
    with free page reporting (Firecracker here) memory freed for a few seconds goes back to the host, and
    whoever needs fresh page cache next (cp's output) pays to fault it back: cp took 3.7 s right after an
    rm and 14.7 s after a 20 s pause."""
    subprocess.run([sys.executable, "-c", _TOUCH, str(nbytes)], check=True)


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit status and peak RSS (MiB) of one child, from wait4."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _merge(args: argparse.Namespace, threads: str, out: Path) -> tuple[dict, float, float]:
    # An older engine (--before) runs from its own folder, also the cwd: `python -c` imports from there.
    root = args.before[threads].resolve() if threads in args.before else REPO
    env = dict(os.environ, PYTHONPATH=str(root))
    if threads != "auto" and threads not in args.before:
        env["MERGE_CORE_MATH_THREADS"] = threads
    cmd = [sys.executable, "-c", _ENGINE, str(args.base), str(args.adapter), str(out), args.dtype, args.device]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    code, rss = _wait(proc)
    wall = time.perf_counter() - started
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        raise SystemExit(f"merge failed (exit {code}):\n{stderr[-3000:]}")
    return json.loads(lines[-1][7:]), wall, rss


def _cp(args: argparse.Namespace, out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(["cp", "-r", str(args.base), str(out)])
    code, rss = _wait(proc)
    os.sync()
    if code != 0:
        raise SystemExit(f"cp failed (exit {code})")
    return time.perf_counter() - started, rss


def _measure(args: argparse.Namespace, row: Row) -> None:
    out = args.scratch / "merge-vs-cp-out"
    for what in ("merge", "cp"):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        _warm(args.base)
        if args.warm_memory:
            _warm_memory(args.warm_memory)
        row.load.append(os.getloadavg()[0])
        if what == "merge":
            result, wall, rss = _merge(args, row.threads, out)
            row.merge_s.append(result["merge_s"])
            row.process_s.append(wall)
            row.rss_mib.append(rss)
            row.phases.append(result["phases"])
            row.used_threads = result["threads"]
        else:
            row.cp_s.append(_cp(args, out)[0])
        print(
            f"  busy={row.busy} threads={row.threads} {what}: "
            f"{(row.merge_s if what == 'merge' else row.cp_s)[-1]:.2f} s (load {row.load[-1]:.2f})",
            flush=True,
        )
    shutil.rmtree(out, ignore_errors=True)


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _table(rows: list[Row]) -> str:
    lines = [
        "| busy loops | math threads | merge s best (median) | cp s best (median) | merge/cp best (median) "
        "| process wall s best | peak RSS MiB | load 1-min |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        best, med = min(r.merge_s) / min(r.cp_s), statistics.median(r.merge_s) / statistics.median(r.cp_s)
        lines.append(
            f"| {r.busy} | {r.threads} ({r.used_threads}) | {min(r.merge_s):.2f} ({statistics.median(r.merge_s):.2f}) "
            f"| {min(r.cp_s):.2f} ({statistics.median(r.cp_s):.2f}) | {best:.2f}x ({med:.2f}x) "
            f"| {min(r.process_s):.2f} | {max(r.rss_mib):.0f} | {min(r.load):.1f}-{max(r.load):.1f} |"
        )
    return "\n".join(lines)


def _make(args: argparse.Namespace) -> None:
    args.base, args.adapter = args.work / f"base{args.make}", args.work / f"lora{args.make}"
    if not (args.base / "config.json").exists() or not (args.adapter / "adapter_config.json").exists():
        script = REPO / "benchmarks" / "make_checkpoint.py"
        cmd = [sys.executable, str(script), str(args.base), "--params", args.make, "--rank", "16", "--force"]
        subprocess.run([*cmd, "--adapter-out", str(args.adapter)], check=True, cwd=REPO)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path)
    p.add_argument("--adapter", type=Path)
    p.add_argument("--make", help="build a synthetic checkpoint of this size (e.g. 3B) under --work if missing")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    p.add_argument("--scratch", type=Path, help="where outputs go (default: beside the base)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="auto,1", help="math-thread settings: 'auto' = the engine's rule, a number")
    p.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a folder holding an older merge_core: adds a row NAME (default 'before') that runs it; repeatable",
    )
    p.add_argument("--busy", default="0,2", help="busy-loop processes beside the runs, per level")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--warm-memory",
        type=float,
        default=0,
        metavar="GB",
        help="touch and free this much memory right before each timed run (a VM's free page reporting)",
    )
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args()
    if args.make:
        _make(args)
    if args.base is None or args.adapter is None:
        p.error("give --base and --adapter, or --make SIZE")
    args.base, args.adapter = args.base.resolve(), args.adapter.resolve()
    args.scratch = (args.scratch or args.base.parent).resolve()
    args.warm_memory = int(args.warm_memory * 1e9) // (64 << 20) * (64 << 20)
    args.before = dict(_named_engine(spec) for spec in args.before)
    return args


def _named_engine(spec: str) -> tuple[str, Path]:
    name, _, folder = spec.rpartition("=")
    return name or "before", Path(folder)


def main() -> None:
    args = parse_args()
    levels = [int(b) for b in args.busy.split(",")]
    settings = args.threads.split(",") + list(args.before)
    rows = {(b, t): Row(b, t) for b in levels for t in settings}
    print(f"{os.cpu_count()} cores, affinity {len(os.sched_getaffinity(0))}; base {args.base}", flush=True)
    for round_ in range(args.rounds):
        for level in levels:
            loops = _busy(level)
            try:
                for row in (r for r in rows.values() if r.busy == level):
                    print(f"round {round_ + 1}", flush=True)
                    _measure(args, row)
            finally:
                for proc in loops:
                    proc.kill()
                    proc.wait()
    print(_table(list(rows.values())))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows.values()], indent=1))


if __name__ == "__main__":
    main()
