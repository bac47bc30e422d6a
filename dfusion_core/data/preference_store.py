"""The curated preference set: labelled pairs that are never lost.

A folder with `store.sqlite` (WAL journal, schema version in PRAGMA user_version) indexing pair files in
`files/`. A pair's files are written atomically first and its row is inserted last, in one transaction:
a process killed at any moment leaves either a whole pair or none (orphan files of an unfinished save are
swept on open; a temp file is swept only once its writer is gone). Several threads or processes may use one
store; SQLite serialises the writes.
"""
from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .atomic import temp_file_is_stale
from .records import PAIR_ID, PairRecord, index_files, record_from_files, write_record_files
from .sharing import (FileReport, ImportReport, index_entries, is_archive, load_pair, pack_zip, pair_folders,
                      portable_model_id, unpack)

SCHEMA_VERSION = 1
LABELS = ("target", "base", "tie")  # which image is preferred; 'skip' is not stored

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    pair_id   TEXT PRIMARY KEY,
    created   REAL NOT NULL,
    prompt    TEXT NOT NULL,
    label     TEXT NOT NULL CHECK (label IN ('target', 'base', 'tie')),
    base_seed INTEGER NOT NULL,
    ref_seed  INTEGER NOT NULL,
    model_id  TEXT NOT NULL,
    scores    TEXT NOT NULL,
    meta      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_prompt ON pairs (prompt);
CREATE INDEX IF NOT EXISTS pairs_label ON pairs (label);
"""


@dataclass(frozen=True)
class PairSummary:
    """A row of the store, without tensors or images (for browsing)."""

    pair_id: str
    created: float
    prompt: str
    label: str
    base_seed: int
    ref_seed: int
    model_id: str
    scores: dict


@dataclass
class DeletedPair:
    """A pair as it was before `delete` removed it (files read back, label, first save time): `restore` undoes."""

    record: PairRecord
    label: str
    created: float


class PreferenceStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"{self.root} is a file, not a store folder")
        self.files = self.root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "store.sqlite"
        with self._connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(f"{self.db_path} has schema version {version}; this dfusion reads up to "
                                 f"{SCHEMA_VERSION}: upgrade dfusion")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._sweep_orphans()

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    def _sweep_orphans(self) -> None:
        """Remove files of saves that never reached the index (killed mid-save), and stray temp files."""
        known = set(self.ids())
        for f in self.files.iterdir():
            if f.name.endswith(".tmp"):
                stale = temp_file_is_stale(f)  # another process may be writing it right now
            else:
                try:
                    stale = f.name.split(".", 1)[0] not in known and time.time() - f.stat().st_mtime > 60
                except FileNotFoundError:
                    stale = False
            if stale:
                f.unlink(missing_ok=True)

    def add(self, rec: PairRecord, label: str, created: float | None = None) -> str:
        """Store a pair with its label; re-adding the same pair_id updates its label. `created` (default: now)
        orders the set; `restore` passes the first save's."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if not rec.pair_id:
            raise ValueError("the pair has no pair_id")
        if not PAIR_ID.fullmatch(rec.pair_id):
            raise ValueError(f"pair_id {rec.pair_id!r} is not a plain name (letters, digits, _ and -)")
        write_record_files(rec, self.files)
        meta = rec.meta()
        meta["label"] = label
        created = time.time() if created is None else created
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO pairs VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(pair_id) DO UPDATE SET "
                       "label = excluded.label, scores = excluded.scores, meta = excluded.meta",
                       (rec.pair_id, created, rec.prompt, label, rec.base_seed, rec.ref_seed, rec.model_id,
                        json.dumps(rec.scores), json.dumps(meta)))
            db.execute("COMMIT")
        return rec.pair_id

    def relabel(self, pair_id: str, label: str) -> None:
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        with self._connect() as db:
            meta = db.execute("SELECT meta FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone()
            if meta is None:
                raise KeyError(f"no pair {pair_id!r} in the store")
            m = json.loads(meta[0])
            m["label"] = label
            db.execute("UPDATE pairs SET label = ?, meta = ? WHERE pair_id = ?", (label, json.dumps(m), pair_id))

    def delete(self, pair_id: str) -> DeletedPair | None:
        """Remove the row first (the commit point), then its files. Returns the pair as it was, for `restore`
        (None when its files could not be read back: it is removed all the same)."""
        with self._connect() as db:
            row = db.execute("SELECT meta, label, created FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone()
        if row is None:
            raise KeyError(f"no pair {pair_id!r} in the store")
        try:
            removed = DeletedPair(record_from_files(json.loads(row[0]), self.files), row[1], row[2])
        except Exception:  # noqa: BLE001 - a damaged pair can still be deleted, without an undo
            removed = None
        with self._connect() as db:
            cur = db.execute("DELETE FROM pairs WHERE pair_id = ?", (pair_id,))
            if cur.rowcount == 0:
                raise KeyError(f"no pair {pair_id!r} in the store")
        for f in self.files.glob(f"{pair_id}.*"):
            f.unlink(missing_ok=True)
        return removed

    def restore(self, removed: DeletedPair) -> str:
        """Put a deleted pair back with its label and its place in the order; refused if its id is in use again."""
        if removed.record.pair_id in self.ids():
            raise ValueError(f"pair {removed.record.pair_id} is in the set again: nothing to restore")
        return self.add(removed.record, removed.label, created=removed.created)

    def ids(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT pair_id FROM pairs ORDER BY created")]

    def summaries(self, prompt_contains: str | None = None, label: str | None = None,
                  limit: int | None = None) -> list[PairSummary]:
        q, args = "SELECT pair_id, created, prompt, label, base_seed, ref_seed, model_id, scores FROM pairs WHERE 1=1", []
        if prompt_contains:
            q += " AND prompt LIKE ?"
            args.append(f"%{prompt_contains}%")
        if label:
            q += " AND label = ?"
            args.append(label)
        q += " ORDER BY created DESC"
        if limit:
            q += f" LIMIT {int(limit)}"
        with self._connect() as db:
            rows = db.execute(q, args).fetchall()
        return [PairSummary(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]

    def get(self, pair_id: str, with_images: bool = True) -> PairRecord:
        with self._connect() as db:
            row = db.execute("SELECT meta FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone()
        if row is None:
            raise KeyError(f"no pair {pair_id!r} in the store")
        return record_from_files(json.loads(row[0]), self.files, with_images)

    def records(self, with_images: bool = False) -> list[PairRecord]:
        """Every pair, oldest first (what training reads)."""
        return [self.get(pid, with_images) for pid in self.ids()]

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    # ---- sharing ---------------------------------------------------------------------------------
    def export(self, dest: str | Path, jpeg_quality: int = 95) -> dict:
        """Write the set to `dest`: pairs.parquet (Pick-a-Pic columns caption, jpg_0 = target, jpg_1 = base,
        label_0 = 1 / 0 / 0.5 for target / base / tie, plus ids, seeds and scores) and a pair folder
        (pairs.jsonl + per-pair safetensors trajectories and PNGs) that `import_pairs` and training read. Model
        ids are written portable (no absolute paths of this machine: portable_model_id)."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        from .records import save_record

        out = Path(dest).expanduser()
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not empty: export into a new folder")
        out.mkdir(parents=True, exist_ok=True)
        cols = {k: [] for k in ("pair_id", "caption", "jpg_0", "jpg_1", "label_0", "label", "base_seed", "ref_seed",
                                "score_0", "score_1", "model_id")}
        for pid in self.ids():
            rec = self.get(pid)
            rec = replace(rec, model_id=portable_model_id(rec.model_id))
            save_record(rec, out)

            def jpg(im):
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=jpeg_quality)
                return buf.getvalue()

            cols["pair_id"].append(pid)
            cols["caption"].append(rec.prompt)
            cols["jpg_0"].append(jpg(rec.images["target"]))
            cols["jpg_1"].append(jpg(rec.images["base"]))
            cols["label_0"].append({"target": 1.0, "base": 0.0, "tie": 0.5}[rec.label])
            cols["label"].append(rec.label)
            cols["base_seed"].append(rec.base_seed)
            cols["ref_seed"].append(rec.ref_seed)
            cols["score_0"].append(rec.scores.get("target"))
            cols["score_1"].append(rec.scores.get("base"))
            cols["model_id"].append(rec.model_id)
        pq.write_table(pa.table(cols), out / "pairs.parquet")
        return {"pairs": len(cols["pair_id"]), "out": str(out)}

    def export_archive(self, dest: str | Path) -> dict:
        """`export` packed into one .zip at `dest` (its top folder named as the archive), written atomically."""
        dest = Path(dest).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export-") as tmp:
            folder = Path(tmp) / dest.name.removesuffix(".zip")
            info = self.export(folder)
            pack_zip(folder, dest)
        return {"pairs": info["pairs"], "out": str(dest)}

    def import_pairs(self, source: str | Path) -> ImportReport:
        """Add the pairs of a pair folder (an export, build-pairs output, or folders holding them) or of a .zip /
        .tar / .tar.gz of one, with their labels. A pair already in the set, or listed twice, is skipped (the
        pair id is content-derived: model, prompt, seeds and parameters); a malformed line or a missing or
        unreadable file fails its pair only. Pairs already in the set are never changed."""
        src = Path(source).expanduser()
        if not src.exists():
            raise ValueError(f"{source} does not exist")
        if src.is_dir():
            return self._import_tree(src, ImportReport(str(src)))
        if not is_archive(src):
            raise ValueError(f"{src.name} is neither a folder nor a readable .zip, .tar or .tar.gz archive")
        with tempfile.TemporaryDirectory(prefix="dfusion-import-") as tmp:
            report = ImportReport(str(src), problems=unpack(src, Path(tmp)))
            return self._import_tree(Path(tmp), report)

    def _import_tree(self, root: Path, report: ImportReport) -> ImportReport:
        folders = pair_folders(root)
        if not folders:
            why = f" ({report.problems[-1][1]})" if report.problems else ": not an export or a build-pairs folder"
            raise ValueError(f"{Path(report.source).name} holds no pairs.jsonl{why}")
        with self._connect() as db:
            present = dict(db.execute("SELECT pair_id, label FROM pairs").fetchall())
        first_seen: dict[str, str] = {}
        for folder in folders:
            for index in index_files(folder):
                fr = FileReport(index.relative_to(root).as_posix())
                report.files.append(fr)
                for n, meta, why in index_entries(index):
                    self._import_line(fr, n, meta, why, folder, present, first_seen)
        return report

    def _import_line(self, fr: FileReport, n: int, meta: dict | None, why: str | None, folder: Path,
                     present: dict[str, str], first_seen: dict[str, str]) -> None:
        """One index line into the set, its outcome written to `fr`."""
        if meta is None:
            fr.failed.append((f"line {n}", why))
            return
        pid, label = meta["pair_id"], meta.get("label", "target")
        if label not in LABELS:
            fr.failed.append((pid, f"line {n}: label {label!r} is not one of {', '.join(LABELS)}"))
        elif pid in first_seen:
            fr.skipped.append((pid, f"line {n} lists it again (first at {first_seen[pid]})"))
        elif pid in present:
            kept = "" if present[pid] == label else f" as '{present[pid]}' (kept; the import says '{label}')"
            fr.skipped.append((pid, f"already in the set{kept}"))
        else:
            rec, why = load_pair(meta, folder)
            if rec is None:
                fr.failed.append((pid, why))
                return
            try:
                self.add(rec, label)
            except OSError as e:
                fr.failed.append((pid, f"could not be saved ({e})"))
                return
            present[pid], first_seen[pid] = label, f"{fr.source} line {n}"
            fr.imported.append(pid)
