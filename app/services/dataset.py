"""The Dataset tab: listing, relabelling, deleting (with undo), exporting and importing curated pairs."""
from __future__ import annotations

import time
from pathlib import Path

from ..session import EXPORT_DIR, MAX_UNDO_DELETES, UserError, score_cell

class DatasetService:
    # ---- the labelled set (the Dataset tab) -----------------------------------------------------------
    def list_pairs(self, prompt_contains, label) -> list[list]:
        """Rows of PAIR_COLUMNS: pairs whose prompt contains the text, with the label ('any' = all), up to 500."""
        rows = self.store.summaries(prompt_contains or None, None if label == "any" else label, limit=500)
        return [[r.pair_id, r.prompt, r.label, r.base_seed, r.ref_seed, score_cell(r.scores.get("base")),
                 score_cell(r.scores.get("target"))] for r in rows]

    def pair_images(self, pair_id: str) -> tuple[object, object]:
        """(base, target) images of a stored pair."""
        rec = self.store.get(pair_id)
        return rec.images.get("base"), rec.images.get("target")

    @staticmethod
    def picked(pair_id) -> str:
        """The pair id a row click put in the box; UserError before any."""
        if not pair_id:
            raise UserError("click a row first")
        return pair_id

    def relabel(self, pair_id, label: str) -> str:
        self.picked(pair_id)
        try:
            self.store.relabel(pair_id, label)
        except KeyError as e:
            raise UserError(str(e)) from None
        return f"pair {pair_id} relabelled '{label}'"

    def delete_pair(self, pair_id, deleted: list) -> str:
        """Delete a pair; it goes on `deleted` (the page's own list, newest last) for `undo_delete`."""
        self.picked(pair_id)
        try:
            removed = self.store.delete(pair_id)
        except KeyError as e:
            raise UserError(str(e)) from None
        if removed is None:
            return f"pair {pair_id} deleted (its files were unreadable: it cannot be restored)"
        deleted.append(removed)
        del deleted[:-MAX_UNDO_DELETES]
        return f"pair {pair_id} deleted · 'Undo delete' restores it"

    @staticmethod
    def check_undo_delete(deleted: list) -> None:
        if not deleted:
            raise UserError("nothing deleted to undo on this page")

    def undo_delete(self, deleted: list) -> str:
        """Restore the last pair deleted from this page, with its label and files."""
        self.check_undo_delete(deleted)
        removed = deleted.pop()
        try:
            self.store.restore(removed)
        except ValueError as e:
            raise UserError(str(e)) from None
        return f"pair {removed.record.pair_id} restored as '{removed.label}'"

    def export(self) -> tuple[str, str]:
        """(message, path of a .zip): the set as Parquet (caption / jpg_0 / jpg_1 / label_0) plus a pair folder
        (trajectories), for the page to offer as a download. Archives older than an hour are removed."""
        self.check_export()
        EXPORT_DIR.mkdir(parents=True, exist_ok=True)
        for old in EXPORT_DIR.glob("*.zip"):
            try:
                if time.time() - old.stat().st_mtime > 3600:
                    old.unlink()
            except FileNotFoundError:  # another page's export swept it first
                pass
        dest = EXPORT_DIR / f"dfusion-pairs-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.zip"
        try:
            info = self.store.export_archive(dest)
        except OSError as e:
            raise UserError(f"the export could not be written: {e}") from None
        return f"exported {info['pairs']} pairs · {dest.name}", info["out"]

    def check_export(self) -> None:
        if len(self.store) == 0:
            raise UserError("the set is empty: label a pair in the Fuse tab first")

    def import_pairs(self, path) -> str:
        """Pairs from an uploaded .zip / .tar / .tar.gz (an export, or a build-pairs folder packed), added to the
        set; the report says per index file what was imported, skipped (duplicates) and failed, and why."""
        if not path:
            raise UserError("choose a .zip, .tar or .tar.gz to import (an export, or a build-pairs folder packed)")
        name = Path(path).name
        if Path(path).is_dir():
            raise UserError("upload one archive (.zip, .tar or .tar.gz), not a folder")
        try:
            report = self.store.import_pairs(path)
        except ValueError as e:
            raise UserError(str(e).replace(str(path), name)) from None
        report.source = name
        return report.text()
