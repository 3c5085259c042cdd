#!/usr/bin/env python3
"""Benchmark LoRA-merge paths on one checkpoint: seed (transformers+PEFT), merge_core, copy floor, mergekit.

Usage:
    python benchmarks/run.py --base DIR --adapter DIR [--rounds 2] [--skip seed] [--device cpu|cuda]
        [--cache warm|cold|both] [--out results.json] [--compare] [--timeout SECONDS]

Every run is its own subprocess (so peak RSS and crashes are isolated) and
methods are interleaved round by round (seed, engine, copy, seed, engine, ...)
so that slow drift of the shared machine hits all methods alike.

Timing: `wall` is the subprocess alone.  Writes can finish in the page cache
and reach the disk later, so `wall incl. sync` adds the duration of an
`os.sync()` issued right after the process exits; that is the number the
ratios use.  A sync is also done before every run (untimed) so earlier dirty
data is not billed to the next run.

Peak RSS: if GNU `/usr/bin/time` exists every command is wrapped in
`/usr/bin/time -v`, whose "Maximum resident set size" is the kernel's
high-water mark of the *largest single process* in the tree (getrusage of
children).  Independently, psutil polls the tree every 20 ms and records the
peak of the *summed* RSS of all descendants (catches multi-process engines,
may miss sub-20 ms spikes).  Both are reported.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
GNU_TIME = "/usr/bin/time"
METHODS = ("seed", "engine", "copy", "mergekit")
GiB = 1 << 30

# ---------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    cache: str
    round: int
    command: list[str]
    ok: bool
    status: str  # "ok", "failed", "timeout", "not installed"
    returncode: int | None = None
    wall_s: float | None = None
    sync_s: float | None = None
    wall_incl_sync_s: float | None = None
    peak_rss_bytes_time: int | None = None  # /usr/bin/time -v, largest process
    peak_rss_bytes_tree_poll: int | None = None  # psutil, summed over the tree
    base_resident_fraction_before: float | None = None  # page-cache residency of BASE at start
    output_bytes: int | None = None
    phases: dict[str, float] = field(default_factory=dict)  # "[seed] load_base 1.2s" lines
    note: str = ""  # "killed by signal 9", "killed after --timeout 60s"
    stdout_tail: str = ""
    stderr_tail: str = ""
    log_dir: str = ""


@dataclass
class Summary:
    method: str
    cache: str
    status: str
    runs: int
    ok_runs: int
    wall_s: float | None
    wall_incl_sync_s: float | None
    peak_rss_gib: float | None
    tree_rss_gib: float | None
    x_copy: float | None
    x_seed: float | None
    failure: str = ""


@dataclass
class CheckpointInfo:
    base: str
    adapter: str
    params: int
    dtype: str
    files: int
    total_bytes: int
    largest_file_bytes: int
    adapter_bytes: int
    adapter_rank: int | None
    adapter_alpha: float | None
    target_modules: list[str] | None


@dataclass
class CompareResult:
    reference: str
    candidate: str
    tensors_compared: int
    missing_in_candidate: list[str]
    extra_in_candidate: list[str]
    shape_or_dtype_mismatch: list[str]
    max_abs_diff: float
    frac_elements_differing: float
    worst_tensor: str


# ---------------------------------------------------------------------------
# Environment and checkpoint description
# ---------------------------------------------------------------------------


def _cmd_out(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _version(pkg: str) -> str:
    # importlib.metadata avoids importing torch & co. into the harness process.
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(scratch: Path) -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _cmd_out(["git", "rev-parse", "--short", "HEAD"], REPO) or "n/a (no commit)"
    dirty = _cmd_out(["git", "status", "--porcelain", "--", "merge_core", "benchmarks"], REPO)
    vm = psutil.virtual_memory()
    du = shutil.disk_usage(scratch)
    fs = _cmd_out(["df", "-T", str(scratch)])
    info: dict[str, object] = {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_total_gib": round(vm.total / GiB, 2),
        "ram_available_gib_at_start": round(vm.available / GiB, 2),
        "scratch_dir": str(scratch),
        "scratch_free_gb": round(du.free / 1e9, 1),
        "scratch_fs": fs.splitlines()[-1].split()[1] if fs else "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "git_commit": commit + ("+dirty" if dirty else ""),
        "rss_method": "GNU /usr/bin/time -v (max single process) + psutil 20 ms tree-sum poll"
        if Path(GNU_TIME).exists()
        else "psutil 20 ms tree-sum poll only (/usr/bin/time missing)",
    }
    if shutil.which("nvidia-smi"):
        info["gpu"] = (
            _cmd_out(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]) or "nvidia-smi failed"
        )
    return info


def safetensors_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def checkpoint_info(base: Path, adapter: Path) -> CheckpointInfo:
    files = weight_files(base)
    params, dtypes = 0, set()
    for p in files:
        for meta in safetensors_header(p).values():
            n = 1
            for d in meta["shape"]:
                n *= d
            params += n
            dtypes.add(meta["dtype"])
    sizes = [p.stat().st_size for p in files]
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    return CheckpointInfo(
        base=str(base),
        adapter=str(adapter),
        params=params,
        dtype="/".join(sorted(dtypes)),
        files=len(files),
        total_bytes=sum(sizes),
        largest_file_bytes=max(sizes, default=0),
        adapter_bytes=sum(p.stat().st_size for p in adapter.glob("*.safetensors")),
        adapter_rank=cfg.get("r"),
        adapter_alpha=cfg.get("lora_alpha"),
        target_modules=cfg.get("target_modules"),
    )


# ---------------------------------------------------------------------------
# Page cache control
# ---------------------------------------------------------------------------


def all_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in sorted(d.rglob("*")) if p.is_file()]


def drop_cache(files: list[Path]) -> None:
    # DONTNEED only evicts clean pages, hence the sync first.
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in page cache, via util-linux fincore."""
    if not shutil.which("fincore") or not files:
        return None
    out = _cmd_out(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)])
    if out is None:
        return None
    res = size = 0
    for line in out.splitlines():
        r, s = line.split()[:2]
        res, size = res + min(int(r), int(s)), size + int(s)
    return res / size if size else None


# ---------------------------------------------------------------------------
# Running one command
# ---------------------------------------------------------------------------


class TreeRssPoller:
    """Peak of summed RSS over a process tree, sampled every `interval` s."""

    def __init__(self, pid: int, exclude_root: bool, interval: float = 0.02) -> None:
        self.pid, self.exclude_root, self.interval = pid, exclude_root, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeRssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = root.children(recursive=True)
                if not self.exclude_root:
                    procs.append(root)
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # progress bars use \r; keep only the last state of each line
    rows = [r.split("\r")[-1][:500] for r in text.splitlines()]
    return "\n".join([r for r in rows if r.strip()][-lines:])


def _parse_gnu_time(path: Path) -> tuple[int | None, int | None, str]:
    """(max RSS bytes, exit status, note) from a `time -v -o` file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, None, ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    status = re.search(r"Exit status: (-?\d+)", text)
    sig = re.search(r"Command terminated by signal (\d+)", text)
    rss_bytes = int(rss.group(1)) * 1024 if rss else None
    if sig:  # GNU time still prints "Exit status: 0" here; use subprocess's -signal convention
        return (
            rss_bytes,
            -int(sig.group(1)),
            f"killed by signal {sig.group(1)}" + (" (OOM killer?)" if sig.group(1) == "9" else ""),
        )
    return rss_bytes, (int(status.group(1)) if status else None), ""


def _dir_bytes(d: Path) -> int | None:
    if not d.exists():
        return None
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def run_command(cmd: list[str], log_dir: Path, out_dir: Path, timeout: float | None, env: dict[str, str]) -> RunResult:
    log_dir.mkdir(parents=True, exist_ok=True)
    use_time = Path(GNU_TIME).exists()
    time_file = log_dir / "time.txt"
    full = [GNU_TIME, "-v", "-o", str(time_file), *cmd] if use_time else cmd
    stdout_p, stderr_p = log_dir / "stdout.txt", log_dir / "stderr.txt"
    res = RunResult("", "", 0, cmd, ok=False, status="failed", log_dir=str(log_dir))
    with open(stdout_p, "wb") as so, open(stderr_p, "wb") as se:
        t0 = time.perf_counter()
        # own session so a timeout can kill exactly this tree
        proc = subprocess.Popen(full, cwd=REPO, stdout=so, stderr=se, env=env, start_new_session=True)
        with TreeRssPoller(proc.pid, exclude_root=use_time) as poll:
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                rc = proc.wait()
                timed_out = True
        res.wall_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    os.sync()
    res.sync_s = time.perf_counter() - t1
    res.wall_incl_sync_s = res.wall_s + res.sync_s
    res.peak_rss_bytes_tree_poll = poll.peak or None
    note = ""
    if use_time:
        res.peak_rss_bytes_time, child_rc, note = _parse_gnu_time(time_file)
        rc = child_rc if child_rc is not None else rc
    res.returncode = rc
    res.ok = rc == 0 and not timed_out
    res.status = "ok" if res.ok else ("timeout" if timed_out else "failed")
    res.output_bytes = _dir_bytes(out_dir)
    res.stdout_tail = _tail(stdout_p, 20)
    res.note = f"killed after --timeout {timeout:g}s" if timed_out else note
    res.stderr_tail = _tail(stderr_p, 20)
    stdout = stdout_p.read_text(errors="replace")
    # seed_merge.py prints "[seed] <phase> <sec>s"; merge_core's summary has a
    # "time: total 0.41s, read 0.02s, ..." line.  Unknown formats just give {}.
    for m in re.finditer(r"^\[(\w+)\] (\w+) ([0-9.]+)s", stdout, re.M):
        res.phases[m.group(2)] = float(m.group(3))
    for line in re.findall(r"^\s*time: (.*)$", stdout, re.M):
        res.phases.update({k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+)s\b", line)})
    return res


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------


def mergekit_available() -> bool:
    return importlib.util.find_spec("mergekit") is not None and shutil.which("mergekit-yaml") is not None


def method_command(
    method: str, base: Path, adapter: Path, out: Path, args: argparse.Namespace, log_dir: Path
) -> list[str]:
    if method == "seed":
        return [
            sys.executable,
            str(BENCH / "seed_merge.py"),
            str(base),
            str(adapter),
            str(out),
            "--device",
            args.seed_device,
        ]
    if method == "engine":
        return [
            sys.executable, "-m", "merge_core", str(base), str(adapter), str(out),
            "--dtype", args.engine_dtype, "--device", args.device, *shlex.split(args.engine_args),
        ]  # fmt: skip
    if method == "copy":
        return ["cp", "-r", str(base), str(out)]
    if method == "mergekit":
        # mergekit's LoRA syntax: "model+adapter" applied via a passthrough merge.
        cfg = log_dir / "mergekit.yml"
        log_dir.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"merge_method: passthrough\ndtype: {args.engine_dtype}\nmodels:\n  - model: {base}+{adapter}\n")
        return ["mergekit-yaml", str(cfg), str(out), *(["--cuda"] if args.device == "cuda" else [])]
    raise ValueError(method)


# ---------------------------------------------------------------------------
# Output comparison (optional correctness check of engine vs seed)
# ---------------------------------------------------------------------------


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    return {name: p for p in weight_files(model_dir) for name in safetensors_header(p)}


def compare_outputs(ref_dir: Path, cand_dir: Path) -> CompareResult:
    from safetensors import safe_open

    ref, cand = _tensor_index(ref_dir), _tensor_index(cand_dir)
    mism: list[str] = []
    worst, worst_name, n_diff, n_total = 0.0, "", 0, 0
    for name in sorted(set(ref) & set(cand)):
        with safe_open(ref[name], "pt") as fr, safe_open(cand[name], "pt") as fc:
            a, b = fr.get_tensor(name), fc.get_tensor(name)
        if a.shape != b.shape or a.dtype != b.dtype:
            mism.append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            continue
        d = (a.float() - b.float()).abs()
        n_diff += int((d > 0).sum())
        n_total += d.numel()
        m = float(d.max()) if d.numel() else 0.0
        if m > worst:
            worst, worst_name = m, name
    return CompareResult(
        reference=str(ref_dir),
        candidate=str(cand_dir),
        tensors_compared=len(set(ref) & set(cand)) - len(mism),
        missing_in_candidate=sorted(set(ref) - set(cand)),
        extra_in_candidate=sorted(set(cand) - set(ref)),
        shape_or_dtype_mismatch=mism,
        max_abs_diff=worst,
        frac_elements_differing=n_diff / n_total if n_total else 0.0,
        worst_tensor=worst_name,
    )


# ---------------------------------------------------------------------------
# Summaries and report
# ---------------------------------------------------------------------------


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(results: list[RunResult]) -> list[Summary]:
    keys = list(dict.fromkeys((r.method, r.cache) for r in results))
    rows: list[Summary] = []
    for method, cache in keys:
        rs = [r for r in results if r.method == method and r.cache == cache]
        ok = [r for r in rs if r.ok]
        rss_t = [r.peak_rss_bytes_time for r in ok if r.peak_rss_bytes_time]
        rss_p = [r.peak_rss_bytes_tree_poll for r in ok if r.peak_rss_bytes_tree_poll]
        fail = next((r for r in rs if not r.ok), None)
        failure = ""
        if fail is not None:
            # the last stderr line is usually the exception message
            last = [line.strip() for line in fail.stderr_tail.splitlines() if line.strip()][-1:]
            failure = f"{fail.status}" + (f" rc={fail.returncode}" if fail.returncode is not None else "")
            failure += "".join(f": {x}" for x in [fail.note, *last] if x)
        status = rs[0].status if len(rs) == 1 or not ok else (f"{len(ok)}/{len(rs)} ok" if len(ok) < len(rs) else "ok")
        rows.append(
            Summary(
                method=method,
                cache=cache,
                status=status,
                runs=len(rs),
                ok_runs=len(ok),
                wall_s=_median([r.wall_s for r in ok]),
                wall_incl_sync_s=_median([r.wall_incl_sync_s for r in ok]),
                peak_rss_gib=max(rss_t) / GiB if rss_t else None,
                tree_rss_gib=max(rss_p) / GiB if rss_p else None,
                x_copy=None,
                x_seed=None,
                failure=failure,
            )
        )
    # Ratios within the same cache state, on the incl.-sync medians.
    for row in rows:
        for ref_name, attr in (("copy", "x_copy"), ("seed", "x_seed")):
            ref = next((r for r in rows if r.method == ref_name and r.cache == row.cache), None)
            if ref and ref.wall_incl_sync_s and row.wall_incl_sync_s:
                setattr(row, attr, row.wall_incl_sync_s / ref.wall_incl_sync_s)
    return rows


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown_report(
    rows: list[Summary],
    results: list[RunResult],
    machine: dict[str, object],
    ckpt: CheckpointInfo,
    args: argparse.Namespace,
    compare: CompareResult | None,
) -> str:
    label = {
        "seed": "seed (transformers+PEFT)",
        "engine": "merge_core",
        "copy": "copy floor (cp -r)",
        "mergekit": "mergekit",
    }
    out = ["## Machine", ""]
    out += [f"- {k}: {v}" for k, v in machine.items()]
    out += [
        "",
        "## Checkpoint",
        "",
        f"- base: `{ckpt.base}` — {ckpt.params / 1e9:.3f}B params, {ckpt.dtype}, {ckpt.files} file(s), "
        f"{ckpt.total_bytes / 1e9:.2f} GB total, largest shard {ckpt.largest_file_bytes / 1e9:.2f} GB",
        f"- adapter: `{ckpt.adapter}` — r={ckpt.adapter_rank}, alpha={ckpt.adapter_alpha}, "
        f"{ckpt.adapter_bytes / 1e6:.1f} MB, targets {ckpt.target_modules}",
        f"- device: {args.device} (seed on {args.seed_device}); rounds: {args.rounds}; engine args: "
        f"`--dtype {args.engine_dtype} --device {args.device} {args.engine_args}`".rstrip(),
        "",
        "## Results",
        "",
        "| method | cache | status | wall s (median) | wall incl. sync s | peak RSS GiB | tree RSS GiB (poll) "
        "| x copy floor | x seed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        status = r.status if not r.failure or r.ok_runs else r.failure
        status = status.replace("|", "\\|")[:300]
        out.append(
            f"| {label.get(r.method, r.method)} | {r.cache} | {status} | {_f(r.wall_s)} | {_f(r.wall_incl_sync_s)} | "
            f"{_f(r.peak_rss_gib, '{:.3f}')} | {_f(r.tree_rss_gib, '{:.3f}')} | "
            f"{_f(r.x_copy, '{:.2f}x')} | {_f(r.x_seed, '{:.2f}x')} |"
        )
    for cache in dict.fromkeys(r.cache for r in results):
        fr = [
            r.base_resident_fraction_before
            for r in results
            if r.cache == cache and r.base_resident_fraction_before is not None
        ]
        if fr:
            out.append(
                f"\nBase resident in page cache at run start ({cache}, fincore): "
                f"{min(fr) * 100:.0f}%–{max(fr) * 100:.0f}%"
            )
    partial = [r for r in rows if r.failure and r.ok_runs]
    for r in partial:
        out.append(f"\n{label.get(r.method, r.method)} / {r.cache}: some rounds failed — {r.failure}")
    if compare is not None:
        out += [
            "",
            "## Output check (merge_core vs seed)",
            "",
            f"- tensors compared: {compare.tensors_compared}; "
            f"missing in merge_core output: {len(compare.missing_in_candidate)}; "
            f"extra: {len(compare.extra_in_candidate)}; shape/dtype mismatches: {len(compare.shape_or_dtype_mismatch)}",
            "- outputs are bit-identical"
            if compare.max_abs_diff == 0
            else f"- max |diff| {compare.max_abs_diff:.3g} (in `{compare.worst_tensor}`), "
            f"{compare.frac_elements_differing * 100:.3g}% of elements differ (PEFT adds a delta already rounded "
            "to the weight dtype, so 1-ulp differences are expected)",
        ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--skip", action="append", default=[], choices=METHODS, help="may be repeated: --skip seed --skip copy"
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="passed to merge_core (and to the seed unless --seed-device)",
    )
    ap.add_argument("--seed-device", default=None, help="device for the seed path (default: --device)")
    ap.add_argument("--cache", default="warm", choices=["warm", "cold", "both"])
    ap.add_argument("--out", type=Path, default=None, help="write all per-run results + summary as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the markdown report to this file")
    ap.add_argument(
        "--scratch", type=Path, default=None, help="where outputs go (default: BASE/../bench-out; same disk as BASE)"
    )
    ap.add_argument("--engine-dtype", default="bfloat16")
    ap.add_argument(
        "--engine-args",
        default="",
        help="extra args for merge_core; use the = form: --engine-args='--compute-dtype float32'",
    )
    ap.add_argument(
        "--timeout", type=float, default=None, help="per-run wall limit in seconds; the tree is killed after it"
    )
    ap.add_argument(
        "--compare", action="store_true", help="round 1: keep seed and engine outputs and compare them tensor by tensor"
    )
    args = ap.parse_args()
    args.seed_device = args.seed_device or args.device
    args.base, args.adapter = args.base.resolve(), args.adapter.resolve()
    args.scratch = (args.scratch or args.base.parent / "bench-out").resolve()
    return args


def main() -> None:
    args = parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = args.scratch / f"logs-{stamp}"
    machine = machine_info(args.scratch)
    ckpt = checkpoint_info(args.base, args.adapter)
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    methods = [m for m in METHODS if m not in args.skip]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    input_files = all_files(args.base, args.adapter)
    if "warm" in caches and ckpt.total_bytes > psutil.virtual_memory().available:
        print(
            f"note: base ({ckpt.total_bytes / GiB:.1f} GiB) exceeds available RAM; 'warm' cannot be fully warm",
            flush=True,
        )

    results: list[RunResult] = []
    kept: dict[str, Path] = {}
    compare: CompareResult | None = None
    for rnd in range(1, args.rounds + 1):
        for cache in caches:
            for method in methods:
                if method == "mergekit" and not mergekit_available():
                    if rnd == 1 and cache == caches[0]:
                        results.append(
                            RunResult(method, cache, rnd, ["mergekit-yaml"], ok=False, status="not installed")
                        )
                        print("mergekit: not installed, skipped", flush=True)
                    continue
                out = args.scratch / f"{method}-{cache}-r{rnd}"
                shutil.rmtree(out, ignore_errors=True)
                log_dir = logs / f"{method}-{cache}-r{rnd}"
                cmd = method_command(method, args.base, args.adapter, out, args, log_dir)
                os.sync()  # untimed: flush earlier writes so they are not billed to this run
                drop_cache(input_files) if cache == "cold" else warm_cache(input_files)
                resident = resident_fraction(weight_files(args.base))
                print(f"[round {rnd}] {method:8s} {cache:4s} ... ", end="", flush=True)
                res = run_command(cmd, log_dir, out, args.timeout, env)
                res.method, res.cache, res.round, res.base_resident_fraction_before = method, cache, rnd, resident
                results.append(res)
                if res.ok:
                    rss = res.peak_rss_bytes_time or res.peak_rss_bytes_tree_poll or 0
                    print(f"{res.wall_s:.2f}s (+sync {res.sync_s:.2f}s), peak RSS {rss / GiB:.2f} GiB", flush=True)
                else:
                    last = res.stderr_tail.splitlines()[-1:] or [""]
                    print(f"{res.status.upper()} rc={res.returncode} {res.note}: {last[0][:200]}", flush=True)
                if args.compare and rnd == 1 and cache == caches[0] and method in ("seed", "engine") and res.ok:
                    kept[method] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)
        if len(kept) == 2 and compare is None:
            print("comparing merge_core output against seed output ...", flush=True)
            compare = compare_outputs(kept["seed"], kept["engine"])
        for d in kept.values():
            shutil.rmtree(d, ignore_errors=True)
        kept.clear()

    rows = summarize(results)
    report = markdown_report(rows, results, machine, ckpt, args, compare)
    print("\n" + report)
    print(f"logs: {logs}")
    if args.markdown:
        args.markdown.write_text(report)
    if args.out:
        payload = {
            "machine": machine,
            "checkpoint": asdict(ckpt),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summary": [asdict(r) for r in rows],
            "runs": [asdict(r) for r in results],
            "compare_engine_vs_seed": asdict(compare) if compare else None,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
