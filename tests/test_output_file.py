"""The merged shards' files: O_DIRECT through aligned chunks, buffered where the filesystem refuses it."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import merge_core.output_file as output_file
from merge_core.output_file import ALIGN, BufferedFile, DirectFile, open_output

# Pieces whose sizes straddle chunk and block boundaries: a header, odd tensors, whole chunks.
_SIZES = [8 + 123, 1, 4095, 4096, 4097, 3 * 4096, 12_345, 2 * 4096 + 2, 7]


def _source(tmp: Path) -> tuple[Path, bytes]:
    data = os.urandom(50_000)
    path = tmp / "source.bin"
    path.write_bytes(data)
    return path, data


def _write_pieces(out, source: Path, source_bytes: bytes) -> bytes:
    """Alternate tensor writes and raw copies; returns the bytes the file must hold."""
    expected = bytearray()
    generator = torch.Generator().manual_seed(0)
    with open(source, "rb") as src:
        for i, size in enumerate(_SIZES):
            if i % 3 == 2:
                offset = 1000 + 97 * i
                out.copy_from(src.fileno(), offset, size)
                expected += source_bytes[offset : offset + size]
            else:
                piece = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
                out.write(piece)
                expected += piece.numpy().tobytes()
    out.close()
    return bytes(expected)


@pytest.mark.parametrize("chunk_bytes", [ALIGN, 3 * ALIGN, 8 << 20])
def test_direct_writes_hold_exactly_the_bytes_given(tmp_path: Path, chunk_bytes: int, monkeypatch) -> None:
    monkeypatch.setattr(output_file, "CHUNK_BYTES", chunk_bytes)
    source, source_bytes = _source(tmp_path)
    out = open_output(tmp_path / "out.bin")
    assert isinstance(out, DirectFile), "this test machine's tmp filesystem takes O_DIRECT"
    expected = _write_pieces(out, source, source_bytes)
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_a_filesystem_without_o_direct_gets_buffered_writes(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs and some FUSE mounts answer
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    source, source_bytes = _source(tmp_path)
    out = open_output(tmp_path / "out.bin")
    assert isinstance(out, BufferedFile)
    expected = _write_pieces(out, source, source_bytes)
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_a_write_refused_after_an_accepted_open_finishes_through_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(output_file, "CHUNK_BYTES", ALIGN)
    real_pwrite, refused = os.pwrite, []

    def refusing_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_direct)
    source, source_bytes = _source(tmp_path)
    expected = _write_pieces(open_output(tmp_path / "out.bin"), source, source_bytes)
    assert refused == [0]  # refused once, then the file dropped O_DIRECT for good
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_a_disk_error_on_the_writing_thread_reaches_the_caller(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(output_file, "CHUNK_BYTES", ALIGN)
    real_pwrite = os.pwrite

    def full_after_two_chunks(fd, data, offset):
        if offset >= 2 * ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_after_two_chunks)
    out = open_output(tmp_path / "out.bin")
    with pytest.raises(OSError) as info:
        for _ in range(64):  # more chunks than the queue holds: a later write must see the error
            out.write(torch.zeros(ALIGN, dtype=torch.uint8))
        out.close()
    assert info.value.errno == errno.ENOSPC
    out.abort()
    assert out.closed


def test_a_file_size_limit_is_one_sentence_and_leaves_nothing(tmp_path: Path) -> None:
    """A real EFBIG from the kernel (RLIMIT_FSIZE) on the direct-write thread, end to end through the CLI's error."""
    from tests.factories import make_adapter, make_base

    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    script = textwrap.dedent(
        f"""
        import resource, sys
        import merge_core.output_file as output_file
        from merge_core import merge_adapter
        from merge_core.errors import MergeError
        output_file.CHUNK_BYTES = 4096
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            merge_adapter({str(base)!r}, {str(adapter)!r}, {str(tmp_path / "merged")!r})
        except MergeError as exc:
            print(type(exc).__name__, exc)
            sys.exit(2)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stdout.startswith("OutputWriteError Could not write the merged model to")
    assert "file-size limit allows; choose a folder on another disk." in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
