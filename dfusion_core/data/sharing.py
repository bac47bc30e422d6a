"""Pair sets in and out of the preference store: archives packed and unpacked safely, pair folders read one
line and one file at a time, and the import report that says, per index file, what was imported, skipped and why.

An import trusts nothing it reads: an archive member is extracted only if it is a plain file (or folder) whose
path stays inside the extraction folder; a pair id must be a plain name (it names files); each index line,
safetensors file and PNG is checked on its own, so a bad one costs its pair only and is named in the report.
"""
from __future__ import annotations

import json
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image
from safetensors.torch import load_file

from .atomic import write_atomic
from .records import IMAGE_ROLES, PAIR_ID, PairRecord, index_files, record_from_tensors

REQUIRED = {"prompt": str, "base_seed": int, "ref_seed": int, "sampling": dict, "fusion": dict}  # index line fields
NEEDED_IMAGES = ("base", "target")  # the two images the Dataset tab shows and an export writes
SHOWN = 20  # skipped / failed items a report's text lists per file (the rest are counted)


def portable_name(source: str | Path) -> str:
    """A model's (or folder's) name without this machine's absolute paths: a folder under the working directory by
    its relative path, one under the home directory as ~/..., another folder by its name, a hub id as it is."""
    p = Path(source)
    if not p.is_absolute():
        return str(source)
    for root, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + str(p.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return p.name or str(source)


def portable_model_id(model_id: str) -> str:
    """A pair's model id as an export writes it: each part (the base, a `+lora:` folder) by its portable_name, so
    a shared set names its model the way the project does and leaks no server path (the pair id is unchanged)."""
    return "+lora:".join(portable_name(part) for part in str(model_id).split("+lora:"))


@dataclass
class FileReport:
    """What one index file of an import gave: each listed pair imported, skipped or failed, with why."""

    source: str  # the index file, relative to what was imported (e.g. dfusion-pairs/pairs.jsonl)
    imported: list[str] = field(default_factory=list)  # pair ids added to the set
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (pair id, why): already in the set, listed twice
    failed: list[tuple[str, str]] = field(default_factory=list)  # (pair id or 'line N', why, naming the bad file)


@dataclass
class ImportReport:
    """An import, per index file; `problems` are archive members that were not extracted, and why."""

    source: str  # the folder or archive imported
    files: list[FileReport] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def imported(self) -> int:
        return sum(len(f.imported) for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(len(f.skipped) for f in self.files)

    @property
    def failed(self) -> int:
        return sum(len(f.failed) for f in self.files) + len(self.problems)

    def summary(self) -> str:
        n = self.imported
        return (f"imported {n} pair{'' if n == 1 else 's'} from {Path(self.source).name}, skipped {self.skipped} "
                f"(duplicates), {self.failed} failed")

    def text(self, shown: int | None = SHOWN) -> str:
        """The summary, then one bullet per index file with its skipped and failed items and why (Markdown that
        reads as plain text too); `shown` caps the items listed per file (None: all)."""
        lines = [self.summary()]
        for f in self.files:
            lines.append(f"- {f.source}: {len(f.imported)} imported, {len(f.skipped)} skipped, {len(f.failed)} failed")
            items = [("skipped", *s) for s in f.skipped] + [("failed", *x) for x in f.failed]
            for kind, what, why in items[:shown]:
                lines.append(f"  - {kind} {what}: {why}")
            if shown is not None and len(items) > shown:
                lines.append(f"  - ... and {len(items) - shown} more")
        lines += [f"- not extracted {name}: {why}" for name, why in self.problems[:shown]]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"source": self.source, "imported": self.imported, "skipped": self.skipped, "failed": self.failed,
                "files": [asdict(f) for f in self.files], "problems": self.problems}


# ---- reading a pair folder, line by line and file by file ------------------------------------------------------
def meta_problem(meta) -> str | None:
    """Why an index line's JSON cannot describe a pair (None when it can)."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    pid = meta.get("pair_id")
    if not isinstance(pid, str) or not PAIR_ID.fullmatch(pid):
        return "no pair_id" if pid is None else f"pair_id {pid!r} is not a plain name (letters, digits, _ and -)"
    for key, typ in REQUIRED.items():
        if key not in meta:
            return f"pair {pid} has no {key!r}"
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            return f"pair {pid}: {key!r} is not a{'n' if typ is int else ''} {typ.__name__}"
    return None


def index_entries(index: Path):
    """(line number, metadata, None) or (line number, None, why not) for each non-blank line of an index file."""
    for n, line in enumerate(index.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, None, f"not JSON ({e.msg}; a line torn by a killed writer, or not a pair index)"
            continue
        why = meta_problem(meta)
        yield n, (meta if why is None else None), why


def load_pair(meta: dict, folder: Path) -> tuple[PairRecord | None, str]:
    """(the pair, '') or (None, why), naming the missing or unreadable file (e.g. a truncated safetensors)."""
    pid = meta["pair_id"]
    f = folder / f"{pid}.safetensors"
    if not f.is_file():
        return None, f"{f.name} is missing"
    try:
        tensors = load_file(str(f))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is unusable, whatever the cause
        return None, f"{f.name} is unreadable (truncated or not safetensors: {e})"
    images = {}
    for role in IMAGE_ROLES:
        png = folder / f"{pid}.{role}.png"
        if not png.is_file():
            if role in NEEDED_IMAGES:
                return None, f"{png.name} is missing"
            continue
        try:
            with Image.open(png) as im:
                images[role] = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, ...
            return None, f"{png.name} is unreadable ({e})"
    try:
        return record_from_tensors(meta, tensors, images), ""
    except KeyError as e:
        return None, f"{f.name} has no tensor {e}"


def pair_folders(root: Path) -> list[Path]:
    """`root` if it is a pair folder, else every pair folder under it (an archive's top folder, several exports)."""
    if index_files(root):
        return [root]
    return sorted({f.parent for f in root.rglob("pairs*.jsonl") if index_files(f.parent)})


# ---- archives ----------------------------------------------------------------------------------------------
def is_archive(path: Path) -> bool:
    return Path(path).is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


def _inside(into: Path, name: str) -> Path | None:
    """Where member `name` goes under `into`, or None when its path would leave it (absolute, '..', a drive)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
        return None
    target = into.joinpath(*parts)
    return target if target.resolve().is_relative_to(into.resolve()) else None


def _members(archive: Path):
    """(name, kind, size, open) per member: kind 'file', 'dir' or 'other' (links, devices: never extracted)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                kind = "dir" if info.is_dir() else "other" if stat.S_ISLNK(mode) else "file"
                yield info.filename, kind, info.file_size, lambda info=info: zf.open(info)
        return
    with tarfile.open(archive) as tf:
        for m in tf:
            kind = "dir" if m.isdir() else "file" if m.isfile() else "other"
            yield m.name, kind, m.size, lambda m=m: tf.extractfile(m)


def unpack(archive: Path, into: Path) -> list[tuple[str, str]]:
    """Extract a .zip / .tar / .tar.gz into `into`, safely: only plain files and folders whose paths stay inside,
    no more bytes than the disk has free. Returns (member, why) for what was not extracted; a damaged archive
    keeps what came out whole before the damage."""
    archive, into = Path(archive), Path(into)
    free, used, problems = shutil.disk_usage(into).free, 0, []
    try:
        for name, kind, size, open_member in _members(archive):
            target = _inside(into, name)
            if target is None or kind == "other":
                problems.append((name, "its path leaves the archive" if target is None else "not a plain file"))
                continue
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            used += size
            if used > free:
                raise ValueError(f"{archive.name} unpacks to more than the {free / 1e9:.1f} GB free on this disk")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open_member() as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                target.unlink(missing_ok=True)
                problems.append((name, f"damaged in the archive ({e})"))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        problems.append((archive.name, f"the archive is damaged; what came before was read ({e})"))
    return problems


def pack_zip(folder: Path, dest: Path) -> Path:
    """Zip `folder` (its name the archive's top folder) into `dest`, written atomically."""
    folder, dest = Path(folder), Path(dest)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    zf.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")
    write_atomic(dest, write)
    return dest
