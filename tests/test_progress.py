"""The CLI's progress bars (tqdm): the current message only, and redraws tqdm's rate allows."""

from __future__ import annotations

from merge_core.progress import ProgressUpdate, TqdmProgress


def test_a_bar_shows_the_current_message_and_redraws_sparingly(capsys) -> None:
    progress = TqdmProgress()
    progress(ProgressUpdate("merge", 0, 1000, "B", "starting"))
    for done in range(1, 1001):  # a merge reports every row block
        progress(ProgressUpdate("merge", done, 1000, "B"))
    progress.close()
    frames = [f for f in capsys.readouterr().err.split("\r") if f.strip()]
    assert any("starting" in f for f in frames)
    assert "starting" not in frames[-1] and "100%" in frames[-1]
    assert len(frames) < 100, f"{len(frames)} redraws for 1000 updates"
