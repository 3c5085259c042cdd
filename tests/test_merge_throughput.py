"""The merge's throughput machinery keeps the output exact: read-ahead, block size, the math-thread rule."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from merge_core.merge import execute_plan
from merge_core.plan import build_plan
from merge_core.read_ahead import BlockRead, ReadAhead
from merge_core.safetensors_io import TensorInfo, read_rows
from merge_core.threads import OVERRIDE_ENV, math_threads, merge_threads
from tests.factories import make_adapter, make_base


def _blocks(values: torch.Tensor, step: int) -> list[BlockRead]:
    def reader(a: int, b: int):
        def read(buffer: torch.Tensor) -> torch.Tensor:
            out = buffer.view(values.dtype)[: (b - a) * values.shape[1]].view(b - a, values.shape[1])
            return out.copy_(values[a:b])

        return read

    n = values.shape[0]
    return [
        BlockRead(("t", a, min(n, a + step)), (min(n, a + step) - a) * values.shape[1] * 4, reader(a, min(n, a + step)))
        for a in range(0, n, step)
    ]


def test_read_ahead_hands_out_every_block_in_order_through_reused_buffers() -> None:
    values = torch.randn(50, 7)
    seen, pointers = [], set()
    with ReadAhead(_blocks(values, 4)) as reads:
        for a in range(0, 50, 4):
            rows = reads.next(("t", a, min(50, a + 4)))
            seen.append(rows.clone())  # valid only until the next call
            pointers.add(rows.data_ptr())
    assert torch.equal(torch.cat(seen), values)
    assert len(pointers) <= 4  # depth 2 + 2 buffers, reused: memory stays at a few blocks


def test_read_ahead_raises_the_reader_error_in_the_caller() -> None:
    def broken(buffer: torch.Tensor) -> torch.Tensor:
        raise OSError("disk went away")

    jobs = [*_blocks(torch.ones(8, 2), 4), BlockRead(("t", 8, 12), 0, broken)]
    with ReadAhead(jobs) as reads:
        reads.next(("t", 0, 4))
        reads.next(("t", 4, 8))
        with pytest.raises(OSError, match="disk went away"):
            reads.next(("t", 8, 12))


def test_read_ahead_refuses_a_block_out_of_step_and_stops_without_hanging() -> None:
    reads = ReadAhead(_blocks(torch.zeros(400, 3), 1))  # far more blocks than the queue holds
    with pytest.raises(RuntimeError, match="out of step"):
        reads.next(("t", 1, 2))
    done = threading.Event()
    closer = threading.Thread(target=lambda: (reads.close(), done.set()))
    closer.start()
    assert done.wait(30), "close() hung with the reader blocked on a full queue"


def test_positional_reads_from_two_threads_share_one_handle(tmp: Path) -> None:
    data = torch.arange(4096 * 64, dtype=torch.int32)
    path = tmp / "raw.bin"
    path.write_bytes(data.numpy().tobytes())
    info = TensorInfo("x", "I32", (4096, 64), 0, data.numel() * 4)
    errors: list[str] = []
    with open(path, "rb") as f:

        def worker(offset: int) -> None:
            for i in range(200):
                a = (offset + i * 37) % 4000
                if not torch.equal(read_rows(f, info, a, a + 96), data.view(4096, 64)[a : a + 96]):
                    errors.append(f"rows {a}: wrong bytes")

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora-embedding-two-pass"])
def test_many_small_blocks_give_the_same_bytes_as_one_block_per_tensor(tmp: Path, dora: bool) -> None:
    """Read-ahead across tensors and blocks (incl. DoRA's two passes over an embedding) changes no bit."""
    base = make_base(tmp / "base", "llama", dtype=torch.bfloat16)
    targets = ["embed_tokens", "q_proj", "down_proj"] if dora else ["q_proj", "v_proj", "up_proj", "down_proj"]
    adapter = make_adapter(base, tmp / "adapter", target_modules=targets, use_dora=dora, magnitude_noise=0.3)
    plan = build_plan(base, adapter)
    execute_plan(plan, tmp / "one", block_elements=1 << 30)
    execute_plan(plan, tmp / "many", block_elements=37)  # blocks of one row, or a few: hundreds of reads
    one, many = sorted((tmp / "one").glob("*.safetensors")), sorted((tmp / "many").glob("*.safetensors"))
    assert [p.name for p in one] == [p.name for p in many]
    for a, b in zip(one, many, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_math_thread_rule() -> None:
    assert math_threads(2, 0.0) == 1  # a 2-core Space: one math thread, the reader and writer get the other core
    assert math_threads(2, 6.0) == 1
    assert math_threads(16, 0.5) == 7
    assert math_threads(16, 20.0) == 1  # busy neighbours: one thread degrades least
    assert math_threads(64, 0.0) == 8


def test_merge_threads_applies_the_rule_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv(OVERRIDE_ENV, "3")
    with merge_threads(torch.device("cpu")) as used:
        assert used == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    monkeypatch.delenv(OVERRIDE_ENV)
    with merge_threads(torch.device("cpu")) as used:
        assert used == math_threads() and torch.get_num_threads() == used
    assert torch.get_num_threads() == before


def test_a_slow_writer_never_rounds_a_block_the_merge_thread_has_moved_on_from(tmp: Path, monkeypatch) -> None:
    """The merge thread hands its float64 blocks to the writer thread (BlockRing) and must wait before reusing one."""
    import time

    import merge_core.output_file as output_file

    base = make_base(tmp / "base", "llama", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp / "adapter", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    plan = build_plan(base, adapter)
    execute_plan(plan, tmp / "fast", block_elements=1 << 30)
    rounded, original = [], output_file.DirectFile.write_rounded

    def slow(self, values, dtype, check):
        time.sleep(0.002)  # the merge thread meanwhile computes the next blocks
        rounded.append(values.numel())
        return original(self, values, dtype, check)

    monkeypatch.setattr(output_file.DirectFile, "write_rounded", slow)
    execute_plan(plan, tmp / "slow", block_elements=37)
    assert len(rounded) > 100  # the hand-off path ran, block by block
    fast, slow_ = sorted((tmp / "fast").glob("*.safetensors")), sorted((tmp / "slow").glob("*.safetensors"))
    for a, b in zip(fast, slow_, strict=True):
        assert a.read_bytes() == b.read_bytes()
