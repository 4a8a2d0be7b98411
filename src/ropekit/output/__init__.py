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

from ropekit.output.checks import (
    check_file_outside,
    check_output_dir,
    check_output_file,
    check_replaceable,
)
from ropekit.output.files import (
    MANIFEST,
    MANIFEST_VERSION,
    STAGING_PREFIX,
    OutputError,
    dir_mode,
    file_digest,
    file_mode,
    make_dirs,
    plain_relative,
    write_file_atomic,
)
from ropekit.output.folder import OutputDir, place_own, remove_own, write_own
from ropekit.output.manifest import (
    Entry,
    Manifest,
    foreign_entries,
    forget,
    iter_foreign,
    owned_files,
    read_manifest,
    record,
)

__all__ = ["MANIFEST", "MANIFEST_VERSION", "STAGING_PREFIX", "Entry", "Manifest", "OutputDir", "OutputError",
           "check_file_outside", "check_output_dir", "check_output_file", "check_replaceable", "dir_mode",
           "file_digest", "file_mode", "foreign_entries", "forget", "iter_foreign", "make_dirs", "owned_files",
           "place_own", "plain_relative", "read_manifest", "record", "remove_own", "write_file_atomic", "write_own"]
