"""Output folders and files that never lose a user's data.

Every command that writes goes through here. The rules:

- A folder is written into only if it is empty, missing, or holds nothing but ropekit's own earlier output;
  anything else is refused unless ``overwrite`` is given.
- What ropekit wrote is recorded in the folder's manifest, ``.ropekit-output.json``: per file its relative path,
  the command, its size and its SHA-256. The manifest is *input from outside* (a folder can be handed over,
  unpacked, damaged or planted): an entry counts only if it names a plain relative path inside the folder
  (no ``..``, no absolute path, no ``.``, not through a symlinked folder) and the file there is a regular file
  whose size and hash still match. A manifest with any entry that fails these checks is ignored as a whole.
  A file whose hash no longer matches is the user's now: it is kept and never replaced.
- ``overwrite`` lets ropekit write its files into a folder that holds other files; it never replaces or removes
  a file ropekit did not write: a same-named user file is refused by name, before anything is moved.
- Files are written under temporary names inside the folder and renamed into place when the whole job is
  done, so an interrupted run leaves the previous output as it was; the manifest records only what a run
  committed.
- Files get ordinary permissions (``0o666 & ~umask``), folders ``0o777 & ~umask``.

Every check runs before any work: ``check_output_dir`` / ``check_output_file`` raise ``OutputError`` (a
``ValueError`` whose message starts with the option, e.g. ``--out: ...``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

MANIFEST = ".ropekit-output.json"
STAGING_PREFIX = ".ropekit-staging-"
MANIFEST_VERSION = 2
# Stop scanning a folder after this many foreign files: enough to name a few, and `--out /` is refused at once.
FOREIGN_SHOWN = 3


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


# ---------------------------------------------------------------------- paths and hashes
def plain_relative(rel: Any) -> str | None:
    """``rel`` as a normalised posix path if it is a plain relative path inside a folder, else None.

    Refused: non-strings, empty, absolute paths, ``.``/``..`` components, backslashes and NUL, the manifest itself.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    text = pure.as_posix()
    if text == MANIFEST:
        return None
    return text


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _parents_are_real_dirs(folder: Path, rel: str) -> bool:
    """Every folder between ``folder`` and ``rel`` is a real folder (not a symlink, not a file)."""
    current = folder
    for part in rel.split("/")[:-1]:
        current = current / part
        st = _lstat(current)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return False
    return True


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file's content."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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
        st = _lstat(path)
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
        if not _parents_are_real_dirs(folder, rel):
            return False
        st = _lstat(folder / rel)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        try:
            return file_digest(folder / rel) == (entry.size, entry.sha256)
        except OSError:
            return False

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


# ---------------------------------------------------------------------- checks before work
def _nearest_existing(path: Path) -> Path:
    p = path
    while _lstat(p) is None and p != p.parent:
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


def _listed(items: list[str], more: bool) -> str:
    return ", ".join(items) + (" and more" if more else "")


def check_replaceable(folder: str | Path, rel: str, *, option: str = "--out",
                      manifest: Manifest | None = None) -> None:
    """ropekit may write the file ``rel`` in ``folder``: nothing is there, or ropekit's own file is.

    A folder ending in ``/`` (``"checkpoints/"``) may be written into if it holds only ropekit's files.
    """
    folder = Path(folder)
    manifest = Manifest.load(folder) if manifest is None else manifest
    is_folder = rel.endswith("/")
    rel = rel.rstrip("/")
    current = folder
    parts = rel.split("/")
    for i, part in enumerate(parts):
        current = current / part
        st = _lstat(current)
        if st is None:
            return
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{option}: {current} is a symlink; ropekit does not write through it: move it "
                              f"away or choose another folder")
        if (not last or is_folder) and not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{option}: cannot write {folder / rel}: {current} is a file in the way")
    if is_folder:
        foreign = [r for _, r in zip(range(FOREIGN_SHOWN + 1), iter_foreign(folder, manifest, under=rel))]
        if foreign:
            raise OutputError(f"{option}: {folder / rel} holds files ropekit did not write "
                              f"({_listed(foreign[:FOREIGN_SHOWN], len(foreign) > FOREIGN_SHOWN)}); ropekit "
                              f"writes there and never replaces a user's file: move them away or choose another "
                              f"folder")
        return
    if stat.S_ISDIR(os.lstat(current).st_mode):
        raise OutputError(f"{option}: cannot write {current}: a folder of that name is in the way")
    if not manifest.owns(folder, rel):
        raise OutputError(f"{option}: {current} exists and was not written by ropekit (or changed since); "
                          f"ropekit never replaces a user's file, even with --overwrite: move it away or "
                          f"choose another folder")


def _resolve_out(path: str | Path, option: str) -> tuple[Path, str]:
    shown = str(path)
    p = Path(path).expanduser()
    st = _lstat(p)
    if st is not None and stat.S_ISLNK(st.st_mode) and not p.exists():
        raise OutputError(f"{option}: {shown} is a symlink to {os.readlink(p)}, which does not exist")
    return p, shown


def check_output_dir(path: str | Path, *, option: str = "--out", overwrite: bool = False,
                     names: Iterable[str] = (), source: str | Path | None = None) -> Path:
    """Check that ``path`` can take a command's output folder; raise ``OutputError`` otherwise.

    Accepted: a missing folder (its parent creatable), an empty one, one holding only ropekit's earlier output,
    or any folder when ``overwrite`` (ropekit then writes its files into it and keeps everything else).
    ``names``: the files (``"x/"`` for folders) the command will write; each must be free or ropekit's, even with
    ``overwrite``. ``source``: the model being read, which can never be the output folder.
    """
    p, shown = _resolve_out(path, option)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option}: {shown} is a file, not a folder")
    if source is not None and p.exists() and Path(source).expanduser().is_dir() and \
            os.path.samefile(p, Path(source).expanduser()):
        raise OutputError(f"{option}: {shown} is the model folder being read; write to another folder")
    if not p.exists():
        _check_creatable(p, option, shown)
        return p
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{option}: {shown} is not writable")
    manifest = Manifest.load(p)
    if not manifest.replaceable:
        manifest.save(p, option)  # raises: a user's file of the manifest's name is never replaced
    if not overwrite:
        foreign = [r for _, r in zip(range(FOREIGN_SHOWN + 1), iter_foreign(p, manifest))]
        if foreign:
            why = f"; its {MANIFEST} was ignored ({manifest.problem})" if manifest.problem else ""
            raise OutputError(f"{option}: {shown} is not empty and holds files ropekit did not write "
                              f"({_listed(foreign[:FOREIGN_SHOWN], len(foreign) > FOREIGN_SHOWN)}){why}; choose "
                              f"a new folder, or pass {_overwrite_hint(option)} to write ropekit's files into it "
                              f"(other files are kept)")
    for name in names:
        check_replaceable(p, name, option=option, manifest=manifest)
    return p


def check_output_file(path: str | Path, *, option: str = "--json", overwrite: bool = False,
                      source: str | Path | None = None) -> Path:
    """Check that ``path`` can take one output file; raise ``OutputError`` otherwise.

    A folder (existing, ``.``, or a name ending in a separator, as typed: a path's ``typed`` attribute) is
    refused with a hint; an existing file only with ``overwrite``; a symlink never (it would be replaced, or
    write elsewhere).
    """
    shown = getattr(path, "typed", None) or str(path)
    p = Path(path).expanduser()
    if p.is_dir() or shown.endswith(("/", os.sep)) or p.name in ("", ".", ".."):
        raise OutputError(f"{option}: {shown} is a folder; give a file name, e.g. "
                          f"{(p / 'results.json').as_posix()}")
    st = _lstat(p)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{option}: {shown} is a symlink; give the path of a regular file")
    if source is not None and st is not None and Path(source).expanduser().exists() and \
            os.path.samefile(p, Path(source).expanduser()):
        raise OutputError(f"{option}: {shown} is the model being read; write to another file")
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{option}: {shown} exists and is not a regular file")
        if not overwrite:
            raise OutputError(f"{option}: {shown} already exists; choose another name or pass "
                              f"{_overwrite_hint(option)} to replace it")
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{option}: cannot replace {shown}: its folder is not writable")
        return p
    _check_creatable(p, option, shown)
    return p


def check_file_outside(file: str | Path, folder: str | Path, *, option: str = "--json",
                       folder_option: str = "--out") -> None:
    """``file`` must not be ``folder`` nor lie inside it (the folder's commit would meet it as a user's file)."""
    f = Path(os.path.abspath(Path(file).expanduser()))
    d = Path(os.path.abspath(Path(folder).expanduser()))
    if f == d:
        raise OutputError(f"{option}: {file} is the {folder_option} folder; give a file name outside it")
    if d in f.parents:
        raise OutputError(f"{option}: {file} is inside the {folder_option} folder {folder}, whose files ropekit "
                          f"manages; give a path outside it")


# ---------------------------------------------------------------------- writing
def make_dirs(path: str | Path) -> Path:
    """``mkdir -p`` with ordinary permissions."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    return path


def _disk_message(exc: OSError, path: Path) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on device while writing {path}")
    return exc


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
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_message(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def record(folder: str | Path, names: Iterable[str], command: str, *, option: str = "--out") -> None:
    """Record the files ``names`` (relative paths) that ropekit has just written into ``folder`` as its output of
    ``command``, with their size and hash. For long jobs that commit files one at a time (checkpoints)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    kept = {rel: e for rel, e in manifest.entries.items() if manifest.owns(folder, rel)}
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
    kept = {rel: e for rel, e in manifest.entries.items() if rel not in drop and manifest.owns(folder, rel)}
    Manifest(kept, manifest.problem, manifest.replaceable).save(folder, option)


def place_own(folder: str | Path, name: str, writer: Callable[[Path], Any], command: str, *,
              option: str = "--out") -> Path:
    """Write one output file ``name`` into ``folder`` now and record it: ``writer(path)`` writes a temporary file
    beside it, renamed into place when complete. Refused if a file ropekit did not write is there."""
    folder = Path(folder)
    rel = plain_relative(Path(name).as_posix())
    if rel is None:
        raise ValueError(f"place_own: {name!r} is not a plain relative path")
    check_replaceable(folder, rel, option=option)
    target = folder / rel
    make_dirs(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix or ".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_message(exc, target) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def owned_files(folder: str | Path, under: str = "") -> list[str]:
    """ropekit's own files in ``folder`` (optionally only under the subfolder ``under``), sorted."""
    manifest = Manifest.load(folder)
    prefix = under.rstrip("/") + "/" if under else ""
    return sorted(rel for rel in manifest.entries if rel.startswith(prefix) and manifest.owns(folder, rel))


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
