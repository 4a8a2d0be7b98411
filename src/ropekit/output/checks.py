"""Checks before any work: may this folder or file take a command's output without losing a user's file?"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from ropekit.output.files import FOREIGN_SHOWN, MANIFEST, OutputError, lstat_or_none
from ropekit.output.manifest import Manifest, iter_foreign


# ---------------------------------------------------------------------- checks before work
def _nearest_existing(path: Path) -> Path:
    p = path
    while lstat_or_none(p) is None and p != p.parent:
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
        st = lstat_or_none(current)
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
    st = lstat_or_none(p)
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
    st = lstat_or_none(p)
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
