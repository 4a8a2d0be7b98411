"""Writing output: one file at a time for long jobs (``place_own``), or a whole folder at once (``OutputDir``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from ropekit.output.checks import check_output_dir, check_replaceable
from ropekit.output.files import (
    STAGING_PREFIX,
    OutputError,
    dir_mode,
    file_digest,
    file_mode,
    make_dirs,
    plain_relative,
    replace_via_temporary,
)
from ropekit.output.manifest import Entry, Manifest, forget, record


def place_own(folder: str | Path, name: str, writer: Callable[[Path], Any], command: str, *,
              option: str = "--out") -> Path:
    """Write one output file ``name`` into ``folder`` now and record it: ``writer(path)`` writes a temporary file
    beside it, renamed into place when complete. Refused if a file ropekit did not write is there."""
    folder = Path(folder)
    rel = plain_relative(Path(name).as_posix())
    if rel is None:
        raise ValueError(f"place_own: {name!r} is not a plain relative path")
    check_replaceable(folder, rel, option=option)
    target = replace_via_temporary(folder / rel, writer)
    record(folder, [rel], command, option=option)
    return target


def write_own(folder: str | Path, name: str, data: str | bytes, command: str, *, option: str = "--out") -> Path:
    """Write one output file ``name`` into ``folder`` now (atomically) and record it: refused if a file ropekit
    did not write is there."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return place_own(folder, name, lambda path: path.write_bytes(payload), command, option=option)


def remove_own(folder: str | Path, names: Iterable[str], *, option: str = "--out") -> list[str]:
    """Remove the files among ``names`` that are ropekit's own (hash still matching), then the folders they leave
    empty; a file that changed is the user's and stays. Returns the removed names."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    removed = []
    for rel in names:
        if manifest.owns(folder, rel):
            (folder / rel).unlink()
            removed.append(rel)
            parent = (folder / rel).parent
            while parent != folder:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
    if removed:
        forget(folder, removed, option=option)
    return removed


class OutputDir:
    """A command's output folder, written all at once when the job succeeds.

    >>> with OutputDir("report", command="compare") as out:     # checks the folder first
    ...     out.write_text("summary.md", text)
    ...     fig.savefig(out.path("plot.png"))                 # any writer: a staging path
    # on success every staged file is renamed into ``report/``; on an exception nothing in ``report/`` changes.

    ``names``: the files the command is known to write, checked before the job (the commit checks every staged
    file again before it moves any).
    """

    def __init__(self, path: str | Path, *, command: str, option: str = "--out", overwrite: bool = False,
                 names: Iterable[str] = (), source: str | Path | None = None):
        self.folder = Path(path).expanduser()
        self.command = command
        self.option = option
        self.overwrite = overwrite
        self.names = tuple(names)
        self.source = source
        self.staging: Path | None = None
        self.created = False
        self.written: list[str] = []

    def __enter__(self) -> "OutputDir":
        check_output_dir(self.folder, option=self.option, overwrite=self.overwrite, names=self.names,
                         source=self.source)
        self.created = not self.folder.exists()
        make_dirs(self.folder)
        self.staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` (a relative path) now; it reaches the folder on success."""
        if self.staging is None:
            raise RuntimeError("OutputDir.path: use the OutputDir in a with statement")
        rel = plain_relative(Path(name).as_posix())
        if rel is None:
            raise ValueError(f"OutputDir.path: {name!r} must be a relative path inside the folder")
        if rel not in self.written:
            self.written.append(rel)
        make_dirs((self.staging / rel).parent)
        return self.staging / rel

    @property
    def root(self) -> Path:
        """The staging folder itself, for writers that fill a whole folder (``save_pretrained``)."""
        if self.staging is None:
            raise RuntimeError("OutputDir.root: use the OutputDir in a with statement")
        return self.staging

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        path.write_text(text, encoding="utf-8")
        return self.folder / name

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, allow_nan=True) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        staging, self.staging = self.staging, None
        try:
            if exc_type is None:
                self._commit(staging)
        except BaseException:
            exc_type = exc_type or OutputError
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if exc_type is not None and self.created:
                try:
                    self.folder.rmdir()  # only if still empty: a failed run leaves no trace
                except OSError:
                    pass
        return False

    def _staged(self, staging: Path) -> list[str]:
        """Every staged file (relative posix paths); a symlink or special file staged is an error."""
        found = []
        for root, dirs, files in os.walk(staging):
            rel_root = Path(root).relative_to(staging)
            os.chmod(root, dir_mode())
            for name in dirs + files:
                full = Path(root) / name
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    raise OutputError(f"{self.option}: the output {(rel_root / name).as_posix()} is not a regular "
                                      f"file; nothing was written")
            for name in files:
                os.chmod(Path(root) / name, file_mode())
                found.append((rel_root / name).as_posix())
        return sorted(found)

    def _commit(self, staging: Path) -> None:
        manifest = Manifest.load(self.folder)
        staged = self._staged(staging)
        # Every check before anything moves: a refused commit leaves the folder as it was.
        for rel in staged:
            check_replaceable(self.folder, rel, option=self.option, manifest=manifest)
        digests = {rel: file_digest(staging / rel) for rel in staged}
        stale = [rel for rel, e in manifest.entries.items()
                 if e.command == self.command and rel not in digests and manifest.owns(self.folder, rel)]
        entries = {rel: e for rel, e in manifest.entries.items() if manifest.owns(self.folder, rel)}
        if not manifest.replaceable:
            manifest.save(self.folder, self.option)  # raises before anything moves
        for rel in staged:
            make_dirs((self.folder / rel).parent)
            os.replace(staging / rel, self.folder / rel)
            entries[rel] = Entry(self.command, *digests[rel])
        # Files this command wrote last time and not this time are stale output of ours: remove them.
        for rel in stale:
            (self.folder / rel).unlink()
            entries.pop(rel)
        Manifest(entries).save(self.folder, self.option)
