#!/usr/bin/env python3
"""Hub to Hub through a throttled local Hub: the streamed merge+push against the network alone.

    python benchmarks/hub_to_hub.py WORKDIR [--params 13B] [--shard-size 5GB] [--down 100MB] [--up 50MB]
        [--out-shard-size 5GB] [--skip-baselines] [--json OUT.json]

Makes a synthetic checkpoint (benchmarks/make_checkpoint.py) and a rank-16 LoRA under WORKDIR, moves the
shards into a local Hub server (tests/hubserver) whose link is throttled per direction, then times:

* download alone: every base shard, one after the other, as the pipeline fetches them (each deleted after);
* upload alone: the same bytes pre-uploaded to a fresh repo and committed once;
* the streamed Hub-to-Hub merge and push (merge_core.stream_merge_push), its peak disk sampled by DiskMeter.

The server keeps uploads as sparse files (HubServer sparse_uploads): checked by sha256, stored as sizes
only, so a 26 GB output needs no 26 GB of disk. Nothing here downloads real weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_DISABLE_XET"] = "1"  # read at import: the local server speaks plain LFS
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

TOKEN = "hf_bench_write_token_0123456789"
BASE_REPO, ADAPTER_REPO = "acme/base-13b", "bench/lora-13b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(work: Path, params: str, shard_size: str) -> tuple[Path, Path]:
    base, adapter = work / f"base-{params}", work / f"lora-{params}"
    if not (base / "config.json").exists() and not (work / "seed.json").exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from make_checkpoint import main as make

        make([str(base), "--params", params, "--shard-size", shard_size, "--adapter-out", str(adapter), "--force"])
    return base, adapter


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def seed_base(hub, base: Path, manifest: Path) -> int:
    """Move the base's weight files into the server's blob store (no copy), commit them with the small files."""
    from tests.hubserver.blobs import wants_lfs

    seen = json.loads(manifest.read_text()) if manifest.exists() else {}
    small: dict[str, bytes] = {}
    for p in sorted(base.iterdir()) if base.exists() else ():
        if p.suffix == ".safetensors":
            sha = _sha256(p)
            hub.state.blobs.adopt(p, sha)
            seen[p.name] = [sha, hub.state.blobs.path(sha).stat().st_size]
            manifest.write_text(json.dumps(seen))
        elif p.is_file():
            small[p.name] = p.read_bytes()
    if small:
        (manifest.parent / "base-small").mkdir(exist_ok=True)
        for name, data in small.items():
            (manifest.parent / "base-small" / name).write_bytes(data)
    small = {p.name: p.read_bytes() for p in (manifest.parent / "base-small").iterdir()}
    hub.create_repo(BASE_REPO)
    hub.add_files(BASE_REPO, small)
    entries = {name: hub.state.blobs.entry(sha, size, lfs=True) for name, (sha, size) in seen.items()}
    with hub.state.lock:
        repo = hub.state.repo("model", BASE_REPO)
        repo.lfs_objects.update(sha for sha, _ in seen.values())
        hub.state.apply_commit(repo, "main", entries, message="weights")
    assert all(wants_lfs(n, s, b"") for n, (_, s) in seen.items())
    return sum(size for _, size in seen.values())


def time_download(url: str, names: list[str], cache: Path) -> float:
    from huggingface_hub import hf_hub_download

    start = time.perf_counter()
    for name in names:
        path = Path(hf_hub_download(BASE_REPO, name, endpoint=url, token=TOKEN, cache_dir=cache))
        path.resolve().unlink()
    shutil.rmtree(cache, ignore_errors=True)
    return time.perf_counter() - start


def time_upload(url: str, hub, names: list[str], shas: dict[str, str]) -> float:
    """The same bytes, read from the server's store, pre-uploaded one by one then committed once."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=url, token=TOKEN)
    api.create_repo("bench/upload-alone")
    start = time.perf_counter()
    ops = []
    for name in names:
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(hub.state.blobs.path(shas[name])))
        api.preupload_lfs_files("bench/upload-alone", additions=[op])
        ops.append(op)
    api.create_commit("bench/upload-alone", operations=ops, commit_message="upload alone")
    return time.perf_counter() - start


class Timeline:
    """Progress updates with their time: when each stage moved and what it said."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.events: list[tuple[float, str, float, float | None, str]] = []
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, update) -> None:
        t = time.perf_counter() - self.start
        self.first.setdefault(update.stage, t)
        self.last[update.stage] = t
        if update.message:
            self.events.append((round(t, 2), update.stage, update.done, update.total, update.message))
            print(f"[{t:7.1f}s] {update.stage}: {update.message}", flush=True)


def time_stream(url: str, work: Path, out_shard: str, max_disk: int | None, *, verify: bool) -> dict:
    from merge_core.hub import HubClient
    from merge_core.inputs import MergeRequest
    from merge_core.stream_push import stream_merge_push

    target = HubClient(TOKEN, url).preflight_push("bench/merged", "new")
    request = MergeRequest(adapter=ADAPTER_REPO, token=TOKEN, endpoint=url, max_shard_size=out_shard)
    timeline = Timeline()
    result = stream_merge_push(
        request, target, work / "stream-work", max_disk=max_disk, progress=timeline, verify=verify
    )
    wall = time.perf_counter() - timeline.start
    shutil.rmtree(work / "stream-work", ignore_errors=True)
    return {
        "wall_s": round(wall, 1),
        "peak_disk_bytes": result.peak_disk_bytes,
        "disk_needed": result.disk_needed,
        "disk_budget": result.disk_budget,
        "stage_first_s": {k: round(v, 1) for k, v in timeline.first.items()},
        "stage_last_s": {k: round(v, 1) for k, v in timeline.last.items()},
        "events": timeline.events,
        "out_shards": len(result.report.shards),
        "verification": result.verification.to_dict()["checks"] if result.verification else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--params", default="13B")
    ap.add_argument("--shard-size", default="5GB", help="the base repo's shards")
    ap.add_argument("--out-shard-size", default="5GB", help="the merged output's shards")
    ap.add_argument("--down", default="100MB", help="download rate, bytes per second")
    ap.add_argument("--up", default="50MB", help="upload rate, bytes per second")
    ap.add_argument("--max-disk", type=int, default=None)
    ap.add_argument("--skip-baselines", action="store_true", help="only the streamed run")
    ap.add_argument("--verify", action="store_true", help="verify each shard in the pipeline (verify_stream)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from tests.hubserver import HubServer
    from tests.hubserver.throttle import env_rate

    os.environ["_HB_DOWN"], os.environ["_HB_UP"] = args.down, args.up
    down, up = env_rate("_HB_DOWN"), env_rate("_HB_UP")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = make_inputs(work, args.params, args.shard_size)
    hub = HubServer(work / "hub", port=_free_port(), down_bps=down, up_bps=up, sparse_uploads=True).start()
    try:
        hub.add_user("bench", TOKEN, write=True)
        hub.add_user("acme", "hf_acme_unused_token_0123456789", write=True)
        total = seed_base(hub, base, work / "seed.json")
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = BASE_REPO
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        hub.create_repo(ADAPTER_REPO)
        hub.upload_dir(ADAPTER_REPO, adapter)
        seen = json.loads((work / "seed.json").read_text())
        names = sorted(seen)
        shard_max = max(size for _, size in seen.values())
        result: dict = {"params": args.params, "base_bytes": total, "base_shards": len(names), "shard_max": shard_max}
        result.update(down_bps=down, up_bps=up, uptime=os.popen("uptime").read().strip())
        print(json.dumps(result), flush=True)
        if not args.skip_baselines:
            result["download_alone_s"] = round(time_download(hub.url, names, work / "dl-cache"), 1)
            print("download alone", result["download_alone_s"], flush=True)
            result["upload_alone_s"] = round(time_upload(hub.url, hub, names, {n: s for n, (s, _) in seen.items()}), 1)
            print("upload alone", result["upload_alone_s"], flush=True)
        result["stream"] = time_stream(hub.url, work, args.out_shard_size, args.max_disk, verify=args.verify)
        result["uptime_after"] = os.popen("uptime").read().strip()
        network = max(result.get("download_alone_s", total / down), result.get("upload_alone_s", total / up))
        result["ratio"] = round(result["stream"]["wall_s"] / network, 3)
        result["peak_disk_shards"] = round(result["stream"]["peak_disk_bytes"] / shard_max, 2)
        summary = {k: v for k, v in result.items() if k != "stream"}
        summary["stream"] = {k: v for k, v in result["stream"].items() if k != "events"}
        print(json.dumps(summary, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
