"""Atomic writes: a failed or killed writer never leaves a half-written file or a missing folder."""
import subprocess
import sys

import pytest

from dfusion_core.data.atomic import move_files_into, replace_folder, temp_file_is_stale, temp_name_for, write_atomic


def test_a_failing_writer_keeps_the_old_content_and_leaves_no_temp_file(tmp_path):
    f = tmp_path / "state.pt"
    f.write_text("old")

    def half_then_fail(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(f, half_then_fail)
    assert f.read_text() == "old" and list(tmp_path.iterdir()) == [f]
    write_atomic(f, lambda p: p.write_text("new"))
    assert f.read_text() == "new" and list(tmp_path.iterdir()) == [f]


def test_temp_files_of_live_and_dead_writers(tmp_path):
    mine = temp_name_for(tmp_path / "x.png")
    mine.write_text("")
    assert not temp_file_is_stale(mine)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    theirs = tmp_path / mine.name.replace(mine.name.rsplit("-", 1)[1], f"{gone.pid}.tmp")
    theirs.write_text("")
    assert temp_file_is_stale(theirs)


def test_replace_folder_swaps_in_the_new_version_and_drops_the_old(tmp_path):
    dest, built = tmp_path / "model", tmp_path / "model.tmp"
    dest.mkdir(), built.mkdir()
    (dest / "w").write_text("old")
    (built / "w").write_text("new")
    replace_folder(built, dest)
    assert (dest / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_move_files_into_replaces_each_file_and_keeps_the_others(tmp_path):
    dest, built = tmp_path / "run", tmp_path / "run" / "export.tmp"
    built.mkdir(parents=True)
    (dest / "log.jsonl").write_text("keep")
    (dest / "weights.safetensors").write_text("old")
    (built / "weights.safetensors").write_text("new")
    move_files_into(built, dest)
    assert (dest / "weights.safetensors").read_text() == "new" and (dest / "log.jsonl").read_text() == "keep"
    assert not built.exists()
