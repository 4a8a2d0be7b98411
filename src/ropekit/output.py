"""Output folders and files that never lose a user's data.

Every command that writes goes through here. The rules:

- A folder is written into only if it is empty, missing, or holds nothing but ropekit's own earlier output
  (recorded in its manifest, ``.ropekit-output.json``); anything else is refused unless ``overwrite`` is given.
- Files are written under temporary names inside the folder and renamed into place when the whole job is
  done, so an interrupted run leaves the previous output as it was.
- ropekit removes only files it wrote: on a re-run, the files the same command wrote last time and did not
  write again. Files and folders of anyone else are never touched, ``overwrite`` or not.
- Files get ordinary permissions (``0o666 & ~umask``), folders ``0o777 & ~umask``.

Every check runs before any work: ``check_output_dir`` / ``check_output_file`` raise ``OutputError`` (a
``ValueError`` whose message starts with the option, e.g. ``--out: ...``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

MANIFEST = ".ropekit-output.json"
STAGING_PREFIX = ".ropekit-staging-"


class OutputError(ValueError):
    """A destination that cannot be written safely; the message starts with the option name."""


# ---------------------------------------------------------------------- permissions
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


# ---------------------------------------------------------------------- manifest
def read_manifest(folder: str | Path) -> dict[str, str]:
    """``{relative path: command}`` of what ropekit wrote into ``folder`` (empty if nothing is recorded).

    A listed path that is a folder is ropekit's as a whole (e.g. a fine-tuning run's ``checkpoints``).
    """
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {str(k): str(v) for k, v in entries.items()}


def _write_manifest(folder: Path, entries: dict[str, str]) -> None:
    from ropekit import __version__

    text = json.dumps({"written_by": f"ropekit {__version__}",
                       "note": "files ropekit wrote here (relative path: command); ropekit never removes others",
                       "entries": dict(sorted(entries.items()))}, indent=2) + "\n"
    write_file_atomic(folder / MANIFEST, text)


def _owned(rel: str, entries: dict[str, str]) -> bool:
    parts = Path(rel).parts
    return any(Path(*parts[: i + 1]).as_posix() in entries for i in range(len(parts)))


def foreign_entries(folder: str | Path) -> list[str]:
    """Files under ``folder`` that ropekit did not write (relative paths, sorted); empty folders do not count."""
    folder = Path(folder)
    entries = read_manifest(folder)
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        keep = []
        for d in dirs:
            rel = (rel_root / d).as_posix()
            if rel_root == Path(".") and d.startswith(STAGING_PREFIX):
                continue
            if _owned(rel, entries):
                continue
            if os.path.islink(os.path.join(root, d)):
                found.append(rel)
                continue
            keep.append(d)
        dirs[:] = keep
        for f in files:
            rel = (rel_root / f).as_posix()
            if rel == MANIFEST or _owned(rel, entries):
                continue
            found.append(rel)
    return sorted(found)


# ---------------------------------------------------------------------- checks before work
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str, shown: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable folder."""
    anchor = _nearest_existing(path.parent if path.parent != path else path)
    if not anchor.is_dir():
        raise OutputError(f"{option}: cannot create {shown}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: cannot create {shown}: {anchor} is not writable")


def _overwrite_hint(option: str) -> str:
    return "--overwrite" if option.startswith("--") else "overwrite=True"


def check_output_dir(path: str | Path, *, option: str = "--out", overwrite: bool = False) -> Path:
    """Check that ``path`` can take a command's output folder; raise ``OutputError`` otherwise.

    Accepted: a missing folder (its parent creatable), an empty one, one holding only ropekit's earlier output,
    or any folder when ``overwrite`` (ropekit then writes its files into it and keeps everything else).
    """
    shown = str(path)
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option}: {shown} is a file, not a folder")
    if not p.exists():
        _check_creatable(p, option, shown)
        return p
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: {shown} is not writable")
    if not overwrite:
        foreign = foreign_entries(p)
        if foreign:
            listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(f"{option}: {shown} is not empty and holds files ropekit did not write ({listed}); "
                              f"choose a new folder, or pass {_overwrite_hint(option)} to write ropekit's files "
                              f"into it (other files are kept)")
    return p


def check_output_file(path: str | Path, *, option: str = "--json", overwrite: bool = False) -> Path:
    """Check that ``path`` can take one output file; raise ``OutputError`` otherwise.

    A folder (existing, ``.``, or a name ending in a separator) is refused with a hint; an existing file only
    with ``overwrite``.
    """
    shown = str(path)
    p = Path(path).expanduser()
    if p.is_dir() or shown.endswith(("/", os.sep)) or p.name in ("", ".", ".."):
        raise OutputError(f"{option}: {shown} is a folder; give a file name, e.g. "
                          f"{(p / 'results.json').as_posix()}")
    if p.exists():
        if not p.is_file():
            raise OutputError(f"{option}: {shown} exists and is not a regular file")
        if not overwrite:
            raise OutputError(f"{option}: {shown} already exists; choose another name or pass "
                              f"{_overwrite_hint(option)} to replace it")
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{option}: cannot replace {shown}: its folder is not writable")
        return p
    _check_creatable(p, option, shown)
    return p


# ---------------------------------------------------------------------- writing
def make_dirs(path: str | Path) -> Path:
    """``mkdir -p`` with ordinary permissions."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    return path


def write_file_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (ordinary mode)."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_dead_staging(folder: Path) -> None:
    """Staging folders left by a ropekit process that was killed (its pid no longer runs) are removed."""
    for entry in folder.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(entry.name[len(STAGING_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def claim(folder: str | Path, names: Iterable[str], command: str) -> None:
    """Record ``names`` (relative paths; a folder counts whole) as ropekit's output of ``command`` in ``folder``.

    For long jobs that write their own files over time (a fine-tuning run's checkpoints): claimed first, so an
    interrupted run's folder is still recognised as ropekit's.
    """
    folder = make_dirs(folder)
    entries = read_manifest(folder)
    entries.update({Path(n).as_posix(): command for n in names})
    _write_manifest(folder, entries)


class OutputDir:
    """A command's output folder, written all at once when the job succeeds.

    >>> with OutputDir("report", command="compare") as out:     # checks the folder first
    ...     out.write_text("summary.md", text)
    ...     fig.savefig(out.path("plot.png"))                 # any writer: a staging path
    # on success every staged file is renamed into ``report/``; on an exception nothing in ``report/`` changes.
    """

    def __init__(self, path: str | Path, *, command: str, option: str = "--out", overwrite: bool = False):
        self.folder = Path(path).expanduser()
        self.command = command
        self.option = option
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.created = False
        self.written: list[str] = []

    def __enter__(self) -> "OutputDir":
        check_output_dir(self.folder, option=self.option, overwrite=self.overwrite)
        self.created = not self.folder.exists()
        make_dirs(self.folder)
        _remove_dead_staging(self.folder)
        self.staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` (a relative path) now; it reaches the folder on success."""
        if self.staging is None:
            raise RuntimeError("OutputDir.path: use the OutputDir in a with statement")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"OutputDir.path: {name!r} must be a relative path inside the folder")
        if rel.as_posix() not in self.written:
            self.written.append(rel.as_posix())
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
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if exc_type is not None and self.created:
                try:
                    self.folder.rmdir()  # only if still empty: a failed run leaves no trace
                except OSError:
                    pass
        return False

    def _commit(self, staging: Path) -> None:
        old = read_manifest(self.folder)
        fmode, dmode = file_mode(), dir_mode()
        for root, dirs, files in os.walk(staging):
            rel_root = Path(root).relative_to(staging)
            for d in dirs:
                target = self.folder / rel_root / d
                if target.exists() and not target.is_dir():
                    raise OutputError(f"{self.option}: cannot write {target}: a file of that name is in the way")
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), dmode)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), fmode)
        committed: list[str] = []
        for root, _dirs, files in os.walk(staging):
            rel_root = Path(root).relative_to(staging)
            make_dirs(self.folder / rel_root)
            for f in files:
                target = self.folder / rel_root / f
                if target.is_dir():
                    raise OutputError(f"{self.option}: cannot write {target}: a folder of that name is in the way")
                os.replace(os.path.join(root, f), target)
                committed.append((rel_root / f).as_posix())
        entries = dict(old)
        # Files this command wrote last time and not this time are stale output of ours: remove them.
        for rel, cmd in old.items():
            if cmd == self.command and rel not in committed:
                target = self.folder / rel
                if target.is_file() or target.is_symlink():
                    target.unlink()
                elif target.is_dir():
                    shutil.rmtree(target)
                entries.pop(rel)
        entries.update({rel: self.command for rel in committed})
        _write_manifest(self.folder, entries)
