"""The preference store never loses or half-writes a pair."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dfusion_core.engine.pairs import PairRecord
from dfusion_core.data.preference_store import PreferenceStore
from dfusion_core.engine.sampling import Trajectory

ROOT = Path(__file__).resolve().parent.parent


def fake_record(i: int, size: int = 8) -> PairRecord:
    g = torch.Generator().manual_seed(i)
    tr = lambda: Trajectory(i, torch.randn(5, 4, size, size, generator=g), torch.arange(4), torch.randn(4),
                            torch.randn(4, 4, size, size, generator=g))
    im = Image.new("RGB", (16, 16), (i % 255, 0, 0))
    return PairRecord(prompt=f"prompt {i}", base_seed=i, ref_seed=i + 1, scores={"base": 0.1, "target": 0.2},
                      sampling={"num_steps": 4}, fusion={"start_step": 3}, keywords=["x"], model_id="m",
                      target=tr(), base=tr(), masks=torch.rand(4, 2, 2), images={"base": im, "target": im, "reference": im},
                      pair_id=f"pair{i:05d}")


def test_add_get_relabel_delete(tmp_path):
    store = PreferenceStore(tmp_path)
    rec = fake_record(1)
    store.add(rec, "target")
    back = store.get("pair00001")
    assert back.label == "target" and torch.equal(back.target.latents, rec.target.latents)
    store.relabel("pair00001", "base")
    assert store.summaries()[0].label == "base"
    store.add(fake_record(2), "tie")
    assert [s.pair_id for s in store.summaries(label="tie")] == ["pair00002"]
    assert [s.pair_id for s in store.summaries(prompt_contains="prompt 1")] == ["pair00001"]
    store.delete("pair00001")
    assert store.ids() == ["pair00002"] and not list((tmp_path / "files").glob("pair00001.*"))
    with pytest.raises(KeyError):
        store.get("pair00001")
    with pytest.raises(ValueError, match="label must be"):
        store.add(fake_record(3), "skip")


def test_reopening_keeps_everything(tmp_path):
    PreferenceStore(tmp_path).add(fake_record(1), "target")
    assert PreferenceStore(tmp_path).ids() == ["pair00001"]


def test_newer_schema_is_refused(tmp_path):
    import sqlite3
    PreferenceStore(tmp_path)
    db = sqlite3.connect(tmp_path / "store.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ValueError, match="schema version 99"):
        PreferenceStore(tmp_path)


def test_killing_a_writer_at_any_moment_leaves_only_whole_pairs(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_preference_store import fake_record
        from dfusion_core.data.preference_store import PreferenceStore
        store = PreferenceStore({str(tmp_path)!r})
        print("ready", flush=True)
        i = 0
        while True:
            store.add(fake_record(i, size=64), "target"); i += 1
    """)
    for kill_after in (0.3, 0.7, 1.1):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(kill_after)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        store = PreferenceStore(tmp_path)
        for pid in store.ids():  # every indexed pair loads whole
            rec = store.get(pid)
            assert rec.target.latents.shape == (5, 4, 64, 64) and set(rec.images) == {"base", "target", "reference"}
    assert len(store) > 0
    assert not list((tmp_path / "files").glob("*.tmp"))


def test_two_processes_write_concurrently(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_preference_store import fake_record
        from dfusion_core.data.preference_store import PreferenceStore
        store = PreferenceStore({str(tmp_path)!r})
        off = int(sys.argv[1])
        for i in range(off, off + 15):
            store.add(fake_record(i), "target")
    """)
    ps = [subprocess.Popen([sys.executable, "-c", script, str(off)]) for off in (0, 1000)]
    assert all(p.wait(timeout=120) == 0 for p in ps)
    assert len(PreferenceStore(tmp_path)) == 30


def test_export_parquet_and_import_back(tmp_path):
    import pyarrow.parquet as pq

    store = PreferenceStore(tmp_path / "a")
    store.add(fake_record(1), "target")
    store.add(fake_record(2), "base")
    store.add(fake_record(3), "tie")
    info = store.export(tmp_path / "export")
    assert info["pairs"] == 3
    table = pq.read_table(tmp_path / "export" / "pairs.parquet").to_pydict()
    assert table["caption"] == ["prompt 1", "prompt 2", "prompt 3"]
    assert table["label_0"] == [1.0, 0.0, 0.5]
    assert table["jpg_0"][0][:2] == b"\xff\xd8"  # JPEG bytes
    other = PreferenceStore(tmp_path / "b")
    assert other.import_pairs(tmp_path / "export") == 3
    assert sorted(s.label for s in other.summaries()) == ["base", "target", "tie"]
    assert torch.equal(other.get("pair00002").base.latents, store.get("pair00002").base.latents)
    with pytest.raises(ValueError, match="not empty"):
        store.export(tmp_path / "export")


def test_opening_a_store_keeps_a_live_writers_temp_file_and_sweeps_a_dead_ones(tmp_path):
    from dfusion_core.data.atomic import temp_name_for
    files = tmp_path / "files"
    files.mkdir()
    live = temp_name_for(files / "pair00001.target.png")  # this process: alive
    live.write_bytes(b"half")
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    dead = live.with_name(live.name.replace(f"-{os.getpid()}.tmp", f"-{dead_proc.pid}.tmp"))
    dead.write_bytes(b"half")
    old_style = files / "pair00002.base.png.tmp"  # unknown owner: swept only when old
    old_style.write_bytes(b"half")
    PreferenceStore(tmp_path)
    assert live.exists() and not dead.exists() and old_style.exists()
    os.utime(old_style, (time.time() - 120, time.time() - 120))
    PreferenceStore(tmp_path)
    assert live.exists() and not old_style.exists()
