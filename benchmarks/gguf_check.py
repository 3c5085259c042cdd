"""A second, independent GGUF reader: llama.cpp (through llama-cpp-python) against the merged model.

    python benchmarks/gguf_check.py MERGED_DIR [--types F32,F16,BF16,Q8_0] [--out DIR]
    python benchmarks/gguf_check.py --tiny all          # every supported architecture, tiny random models

For each type: export the GGUF (time, bytes, peak RSS, and `cp` of the same bytes for comparison), the
transformers rows of merge_core.gguf_export.verify_gguf, then llama.cpp's token ids on the same probe
strings and its logits on the same token ids. Prints one markdown row per type for benchmarks/RESULTS.md.

llama-cpp-python is not a requirement: it builds llama.cpp from source (about 11 minutes on 2 cores), too
slow for the test suite. Install it by hand (`pip install llama-cpp-python`) to run this script; without it
the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# llama.cpp runs its own kernels (different summation order), so F32 is close but not bitwise equal
LLAMA_CPP_F32_THRESHOLD = 1e-3


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(
            "llama-cpp-python is not installed, so the second reader cannot run; install it by hand with "
            "`pip install llama-cpp-python` (it compiles llama.cpp, about 11 minutes on 2 cores) and run this again."
        )
        return 0
    from merge_core.gguf_export import supported_architectures

    out = Path(args.out or tempfile.mkdtemp(prefix="gguf-check-"))
    folders = [Path(args.merged_dir)] if args.merged_dir else []
    if args.tiny:
        from tests.gguf_models import make_merged_folder

        archs = supported_architectures() if args.tiny == "all" else args.tiny.split(",")
        folders += [make_merged_folder(out / f"tiny-{a}", a, tie=a.startswith("gemma")) for a in archs]
    print(
        "| model | type | export s | cp s | MiB | peak RSS MiB | transformers | llama.cpp tokens | llama.cpp logits |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        for qtype in args.types.split(","):
            print(_row(folder, out / f"{folder.name}-{qtype}.gguf", qtype), flush=True)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merged_dir", nargs="?", help="a merged model folder")
    parser.add_argument("--types", default="F32,F16,BF16,Q8_0")
    parser.add_argument("--tiny", help="'all' or comma-separated model_types: tiny random models built on the fly")
    parser.add_argument("--out", help="folder for the GGUF files (a temporary one by default)")
    args = parser.parse_args(argv)
    if not args.merged_dir and not args.tiny:
        parser.error("give MERGED_DIR or --tiny")
    return args


def _row(folder: Path, gguf_file: Path, qtype: str) -> str:
    from merge_core.gguf_export import export_gguf, verify_gguf

    report = export_gguf(folder, gguf_file, qtype=qtype)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cp_seconds = _cp_seconds(gguf_file)
    rows = verify_gguf(folder, gguf_file, qtype=qtype)
    cells = (f"{r.name.split(' (')[0].removeprefix('gguf ')} {r.status} {r.value}" for r in rows)
    transformers = ", ".join(cells).replace("|", "\\|")  # a markdown cell
    tokens, logits = _llama_cpp(folder, gguf_file, qtype)
    size = report.bytes_written / 2**20
    return (
        f"| {folder.name} | {qtype} | {report.seconds:.2f} | {cp_seconds:.2f} | {size:.1f} | {peak_mib:.0f} "
        f"| {transformers} | {tokens} | {logits} |"
    )


def _cp_seconds(path: Path) -> float:
    target = path.with_suffix(".copy")
    started = time.monotonic()
    shutil.copyfile(path, target)
    seconds = time.monotonic() - started
    target.unlink()
    return seconds


def _llama_cpp(folder: Path, gguf_file: Path, qtype: str) -> tuple[str, str]:
    import numpy as np
    import torch
    from llama_cpp import Llama
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from merge_core.gguf_export.verify import LOGIT_THRESHOLDS, PROBE_IDS_LENGTH, TOKEN_PROBES

    llm = Llama(model_path=str(gguf_file), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    same = sum(reference.encode(p).ids == llm.tokenize(p.encode(), add_bos=True, special=True) for p in TOKEN_PROBES)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, merged.config.vocab_size, (1, PROBE_IDS_LENGTH), generator=generator)
    with torch.no_grad():
        expected = merged(ids).logits[0].numpy()
    llm.reset()
    llm.eval(ids[0].tolist())
    got = np.asarray(llm.scores[:PROBE_IDS_LENGTH, : expected.shape[1]])
    share = float(np.abs(got - expected).max() / np.abs(expected).max())
    threshold = LLAMA_CPP_F32_THRESHOLD if qtype == "F32" else LOGIT_THRESHOLDS[qtype]
    verdict = "pass" if share <= threshold else "FAIL"
    return f"{same}/{len(TOKEN_PROBES)} identical", f"{verdict} {share:.3%} (<= {threshold:.1%})"


if __name__ == "__main__":
    sys.exit(main())
