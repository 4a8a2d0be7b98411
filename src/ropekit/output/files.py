"""Plain file operations of the output rules: ordinary permissions, atomic writes, safe path checks, hashes."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

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


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def parents_are_real_dirs(folder: Path, rel: str) -> bool:
    """Every folder between ``folder`` and ``rel`` is a real folder (not a symlink, not a file)."""
    current = folder
    for part in rel.split("/")[:-1]:
        current = current / part
        st = lstat_or_none(current)
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


# ---------------------------------------------------------------------- writing
def make_dirs(path: str | Path) -> Path:
    """``mkdir -p`` with ordinary permissions."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    return path


def disk_full_error(exc: OSError, path: Path) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on device while writing {path}")
    return exc


def replace_via_temporary(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """``writer(tmp)`` writes a temporary file beside ``path`` (same suffix, so format-guessing writers such as
    ``savefig`` work), which then gets the ordinary mode and is renamed onto ``path``; on any error the temporary
    file is removed and ``path`` is as it was (a full disk is an OSError saying so)."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise disk_full_error(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_file_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (ordinary mode)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return replace_via_temporary(path, lambda tmp: tmp.write_bytes(payload))
