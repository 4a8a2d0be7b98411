"""The output manifest (``.ropekit-output.json``): what ropekit wrote into a folder, read as untrusted input."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ropekit.output.files import (
    MANIFEST,
    MANIFEST_VERSION,
    STAGING_PREFIX,
    OutputError,
    lstat_or_none,
    parents_are_real_dirs,
    file_digest,
    plain_relative,
    write_file_atomic,
)


# ---------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Entry:
    command: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    """The validated manifest of a folder: ``entries`` is empty when the file is missing or fails a check
    (``problem`` says which); ``replaceable`` is False when a file of the manifest's name is there that ropekit
    cannot recognise as a manifest at all (it is then a user's file and is never replaced)."""

    entries: dict[str, Entry]
    problem: str | None = None
    replaceable: bool = True

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        st = lstat_or_none(path)
        if st is None:
            return cls({})
        if not stat.S_ISREG(st.st_mode):
            return cls({}, "it is not a regular file", replaceable=False)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return cls({}, f"it cannot be read ({type(exc).__name__})", replaceable=False)
        if not isinstance(data, dict) or not str(data.get("written_by", "")).startswith("ropekit"):
            return cls({}, "it was not written by ropekit", replaceable=False)
        if data.get("version") != MANIFEST_VERSION:
            return cls({}, "it is from an older ropekit, without checksums")
        raw = data.get("entries")
        if not isinstance(raw, dict):
            return cls({}, "it has no entries table")
        entries: dict[str, Entry] = {}
        for key, value in raw.items():
            rel = plain_relative(key)
            if rel is None or rel != key or rel.split("/")[0].startswith(STAGING_PREFIX):
                return cls({}, f"it names {key!r}, not a plain path inside the folder")
            if not (isinstance(value, dict) and isinstance(value.get("command"), str)
                    and type(value.get("size")) is int and value["size"] >= 0
                    and isinstance(value.get("sha256"), str) and len(value["sha256"]) == 64):
                return cls({}, f"its entry {key!r} is malformed")
            entries[rel] = Entry(value["command"], value["size"], value["sha256"].lower())
        return cls(entries)

    def owns(self, folder: str | Path, rel: str) -> bool:
        """``rel`` is a regular file inside ``folder``, reached through real folders, with the recorded content."""
        entry = self.entries.get(rel)
        if entry is None:
            return False
        folder = Path(folder)
        if not parents_are_real_dirs(folder, rel):
            return False
        st = lstat_or_none(folder / rel)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        try:
            return file_digest(folder / rel) == (entry.size, entry.sha256)
        except OSError:
            return False

    def still_there(self, folder: str | Path) -> dict[str, Entry]:
        """The entries whose file is still a regular file of the recorded size (no hashing: cheap enough to run
        on every record; ownership itself is checked with the hash wherever it decides anything, ``owns``)."""
        folder = Path(folder)
        kept = {}
        for rel, entry in self.entries.items():
            st = lstat_or_none(folder / rel) if parents_are_real_dirs(folder, rel) else None
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
                kept[rel] = entry
        return kept

    def save(self, folder: Path, option: str = "--out") -> None:
        if not self.replaceable:
            raise OutputError(f"{option}: {folder / MANIFEST} is not ropekit's record ({self.problem}); ropekit will not "
                              f"replace it: move it away or choose another folder")
        from ropekit import __version__

        text = json.dumps({"written_by": f"ropekit {__version__}", "version": MANIFEST_VERSION,
                           "note": "files ropekit wrote here (relative path: command, size, sha256); ropekit never "
                                   "replaces or removes any other file",
                           "entries": {rel: e.to_dict() for rel, e in sorted(self.entries.items())}}, indent=2) + "\n"
        write_file_atomic(folder / MANIFEST, text)


def read_manifest(folder: str | Path) -> dict[str, str]:
    """``{relative path: command}`` of the files ropekit wrote into ``folder`` and that are still as it wrote
    them (empty if nothing is recorded, or the manifest fails a check)."""
    manifest = Manifest.load(folder)
    return {rel: e.command for rel, e in manifest.entries.items() if manifest.owns(folder, rel)}


def _is_staging(name: str) -> bool:
    return name.startswith(STAGING_PREFIX)


def iter_foreign(folder: str | Path, manifest: Manifest | None = None, under: str = "") -> Iterator[str]:
    """Files under ``folder`` (or its subfolder ``under``) that ropekit did not write, lazily, shallow first.

    Symlinks and special files are foreign; symlinked folders are not followed; empty folders do not count;
    top-level ``.ropekit-staging-*`` folders are skipped (never written into or removed by a later run); a
    manifest that fails its checks counts as foreign (the folder is then not known to be ropekit's).
    """
    folder = Path(folder)
    manifest = Manifest.load(folder) if manifest is None else manifest
    queue = [under]
    while queue:
        rel_dir = queue.pop(0)
        try:
            with os.scandir(folder / rel_dir if rel_dir else folder) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError:
            yield rel_dir or "."
            continue
        for item in items:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            if not rel_dir and (item.name == MANIFEST and manifest.problem is None
                                or _is_staging(item.name) and item.is_dir(follow_symlinks=False)):
                continue
            if item.is_dir(follow_symlinks=False):
                queue.append(rel)
            elif not manifest.owns(folder, rel):
                yield rel


def foreign_entries(folder: str | Path, limit: int | None = None) -> list[str]:
    """Files under ``folder`` that ropekit did not write (relative paths), at most ``limit`` of them."""
    found: list[str] = []
    for rel in iter_foreign(folder):
        found.append(rel)
        if limit is not None and len(found) >= limit:
            break
    return found


def record(folder: str | Path, names: Iterable[str], command: str, *, option: str = "--out") -> None:
    """Record the files ``names`` (relative paths) that ropekit has just written into ``folder`` as its output of
    ``command``, with their size and hash. For long jobs that commit files one at a time (checkpoints)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    kept = manifest.still_there(folder)  # not a re-hash of every recorded file (checkpoints, weights) per record
    for name in names:
        rel = plain_relative(Path(name).as_posix())
        if rel is None:
            raise ValueError(f"record: {name!r} is not a plain relative path")
        size, sha = file_digest(folder / rel)
        kept[rel] = Entry(command, size, sha)
    Manifest(kept, manifest.problem, manifest.replaceable).save(folder, option)


def forget(folder: str | Path, names: Iterable[str], *, option: str = "--out") -> None:
    """Drop ``names`` from the manifest (after ropekit removed them)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    drop = set(names)
    kept = {rel: e for rel, e in manifest.still_there(folder).items() if rel not in drop}
    Manifest(kept, manifest.problem, manifest.replaceable).save(folder, option)


def owned_files(folder: str | Path, under: str = "") -> list[str]:
    """ropekit's own files in ``folder`` (optionally only under the subfolder ``under``), sorted."""
    manifest = Manifest.load(folder)
    prefix = under.rstrip("/") + "/" if under else ""
    return sorted(rel for rel in manifest.entries if rel.startswith(prefix) and manifest.owns(folder, rel))
