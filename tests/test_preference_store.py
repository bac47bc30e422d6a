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

from dfusion_core.pairs.build import PairRecord
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert other.import_pairs(tmp_path / "export").imported == 3
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


# ---- import: a report per index file, duplicates skipped by content id, bad lines and files named ------------------
def _pair_folder(tmp_path, ids, name="export"):
    """An export (pair folder) of fake pairs `ids`, labelled target."""
    src = PreferenceStore(tmp_path / f"src-{name}")
    for i in ids:
        src.add(fake_record(i), "target")
    src.export(tmp_path / name)
    return tmp_path / name


def test_reimporting_and_duplicated_lines_count_as_skipped_not_imported(tmp_path):
    folder = _pair_folder(tmp_path, [1, 2])
    index = folder / "pairs.jsonl"
    index.write_text(index.read_text() + index.read_text().splitlines()[0] + "\n")  # pair 1 listed twice
    store = PreferenceStore(tmp_path / "store")
    store.add(fake_record(2), "base")  # already here, with another label
    report = store.import_pairs(folder)
    [fr] = report.files
    assert fr.source == "pairs.jsonl" and fr.imported == ["pair00001"] and fr.failed == []
    assert [pid for pid, _ in fr.skipped] == ["pair00002", "pair00001"]
    assert "already in the set as 'base'" in fr.skipped[0][1] and "lists it again" in fr.skipped[1][1]
    assert store.get("pair00002", with_images=False).label == "base"  # the pair in the set is never changed
    again = store.import_pairs(folder)
    assert (again.imported, again.skipped, again.failed) == (0, 3, 0) and len(store) == 2
    assert again.summary().startswith("imported 0 pairs")


def test_malformed_lines_and_a_truncated_safetensors_are_named_and_the_rest_is_imported(tmp_path):
    folder = _pair_folder(tmp_path, [1, 2, 3, 4])
    index = folder / "pairs.jsonl"
    lines = index.read_text().splitlines()
    lines[1] = lines[1][:40]  # torn JSON (pair 2)
    lines.insert(3, '{"pair_id": "../../etc/passwd", "prompt": "x"}')
    index.write_text("\n".join(lines) + "\n")
    tensors = folder / "pair00003.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:300])  # truncated
    (folder / "pair00004.target.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    store = PreferenceStore(tmp_path / "store")
    store.add(fake_record(9), "tie")
    report = store.import_pairs(folder)
    [fr] = report.files
    assert fr.imported == ["pair00001"] and store.ids() == ["pair00009", "pair00001"]
    failed = dict(fr.failed)
    assert set(failed) == {"line 2", "line 4", "pair00003", "pair00004"}, failed
    assert failed["line 2"].startswith("not JSON") and "not a plain name" in failed["line 4"]
    assert failed["pair00003"].startswith("pair00003.safetensors is unreadable")
    assert failed["pair00004"].startswith("pair00004.target.png is unreadable")
    text = report.text()
    assert "imported 1 pair from export" in text and "4 failed" in text and "pair00003.safetensors" in text
    assert not list((tmp_path / "store" / "files").glob("pair0000[234]*"))  # nothing of a failed pair is kept


def test_import_from_zip_and_tar_archives_with_several_index_files(tmp_path):
    import shutil
    import tarfile
    import zipfile

    folder = _pair_folder(tmp_path, [1, 2, 3])
    lines = (folder / "pairs.jsonl").read_text().splitlines()
    (folder / "pairs.jsonl").write_text(lines[0] + "\n")
    (folder / "pairs.p1.jsonl").write_text("\n".join(lines[1:]) + "\n")  # a second process's index
    zipped = Path(shutil.make_archive(str(tmp_path / "set"), "zip", tmp_path, "export"))
    store = PreferenceStore(tmp_path / "a")
    report = store.import_pairs(zipped)
    assert [(f.source, len(f.imported)) for f in report.files] == [("export/pairs.jsonl", 1), ("export/pairs.p1.jsonl", 2)]
    assert torch.equal(store.get("pair00002").base.latents, fake_record(2).base.latents)
    with tarfile.open(tmp_path / "set.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="export")
    assert PreferenceStore(tmp_path / "b").import_pairs(tmp_path / "set.tar.gz").imported == 3
    evil = tmp_path / "evil.zip"  # a member that would land outside the extraction folder is not extracted
    with zipfile.ZipFile(evil, "w") as zf:
        zf.write(folder / "pairs.jsonl", "export/pairs.jsonl")
        for f in folder.glob("pair00001.*"):
            zf.write(f, f"export/{f.name}")
        zf.writestr("../../escaped.txt", "x")
    report = PreferenceStore(tmp_path / "c").import_pairs(evil)
    assert report.imported == 1 and report.problems == [("../../escaped.txt", "its path leaves the archive")]
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.parent.glob("escaped.txt"))


def _truncated_archive(d: Path) -> Path:
    """A .tar.gz of an export (its index packed last) cut short before the index."""
    import tarfile

    folder = _pair_folder(d, [1, 2, 3])
    with tarfile.open(d / "full.tar.gz", "w:gz") as tf:
        for f in sorted(folder.iterdir(), key=lambda f: f.name.startswith("pairs")):
            tf.add(f, f"export/{f.name}")
    data = (d / "full.tar.gz").read_bytes()
    (d / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    return d / "cut.tar.gz"


@pytest.mark.parametrize("make,msg", [
    (lambda d: d / "missing", "does not exist"),
    (_truncated_archive, "holds no pairs.jsonl .the archive is damaged"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no pairs.jsonl"),
    (lambda d: (d / "x.zip").write_bytes(b"not a zip") and d / "x.zip", "neither a folder nor a readable .zip"),
])
def test_import_of_a_missing_or_wrong_source_is_a_clear_error_and_changes_nothing(tmp_path, make, msg):
    store = PreferenceStore(tmp_path / "store")
    store.add(fake_record(1), "tie")
    with pytest.raises(ValueError, match=msg):
        store.import_pairs(make(tmp_path))
    assert store.ids() == ["pair00001"] and store.get("pair00001", with_images=False).label == "tie"


def test_delete_then_restore_gives_back_the_pair_with_its_label_files_and_place(tmp_path):
    store = PreferenceStore(tmp_path)
    for i, lab in ((1, "base"), (2, "tie"), (3, "target")):
        store.add(fake_record(i), lab)
    files = sorted(f.name for f in (tmp_path / "files").glob("pair00002.*"))
    removed = store.delete("pair00002")
    assert store.ids() == ["pair00001", "pair00003"] and not list((tmp_path / "files").glob("pair00002.*"))
    store.restore(removed)
    assert store.ids() == ["pair00001", "pair00002", "pair00003"]  # back in its place, not as the newest
    back = store.get("pair00002")
    assert back.label == "tie" and set(back.images) == {"base", "reference", "target"}
    assert torch.equal(back.target.latents, fake_record(2).target.latents)
    assert sorted(f.name for f in (tmp_path / "files").glob("pair00002.*")) == files
    with pytest.raises(ValueError, match="in the set again"):
        store.restore(removed)


def test_export_archive_is_one_zip_that_imports_back(tmp_path):
    import zipfile

    store = PreferenceStore(tmp_path / "a")
    store.add(fake_record(1), "base")
    info = store.export_archive(tmp_path / "out" / "set.zip")
    names = zipfile.ZipFile(info["out"]).namelist()
    assert info["pairs"] == 1 and "set/pairs.parquet" in names and "set/pairs.jsonl" in names
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["set.zip"]  # no temp folder left behind
    other = PreferenceStore(tmp_path / "b")
    assert other.import_pairs(info["out"]).imported == 1 and other.get("pair00001").label == "base"


def test_an_export_names_the_model_without_this_machines_paths(tmp_path, monkeypatch):
    """A pair fused from an absolute folder (as the app loads its model) with a LoRA of a run folder is exported
    with the project-relative / home-relative / bare names: the archive leaks no server path, the pair id stays."""
    import json
    from dataclasses import replace

    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    store = PreferenceStore(tmp_path / "store")
    absolute = f"{tmp_path / 'assets' / 'model'}+lora:{tmp_path / 'runs' / 'dpo-1'}"
    store.add(replace(fake_record(1), model_id=absolute), "target")
    store.add(replace(fake_record(2), model_id="/elsewhere/models/sd"), "base")
    store.add(replace(fake_record(3), model_id="org/hub-model"), "tie")
    store.export(tmp_path / "export")
    names = pq.read_table(tmp_path / "export" / "pairs.parquet").to_pydict()["model_id"]
    assert names == ["assets/model+lora:runs/dpo-1", "sd", "org/hub-model"]
    lines = [json.loads(x) for x in (tmp_path / "export" / "pairs.jsonl").read_text().splitlines()]
    assert [x["model_id"] for x in lines] == names and str(tmp_path) not in (tmp_path / "export" / "pairs.jsonl").read_text()
    assert store.get("pair00001").model_id == absolute  # the set itself keeps the id training reloads the model by
