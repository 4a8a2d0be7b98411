"""ropekit.output: output folders never lose a user's files; writes are atomic; ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ropekit.output import (
    MANIFEST,
    OutputDir,
    OutputError,
    check_output_dir,
    check_output_file,
    foreign_entries,
    record,
    write_file_atomic,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_folder_is_written_with_ordinary_permissions(tmp_path):
    out = tmp_path / "report"
    with OutputDir(out, command="compare") as o:
        o.write_text("summary.md", "# hi\n")
        o.write_json("sub/results.json", {"a": 1})
    assert (out / "summary.md").read_text() == "# hi\n"
    assert json.loads((out / "sub" / "results.json").read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(out / "summary.md") == 0o666 & ~umask
    assert _mode(out / "sub") == 0o777 & ~umask
    assert _mode(out) == 0o777 & ~umask
    # nothing but the outputs and the manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "summary.md", "sub"])


def test_user_files_refuse_the_folder_before_any_work(tmp_path):
    (tmp_path / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match=r"^--out: .*\(thesis\.txt\).*--overwrite"):
        check_output_dir(tmp_path)
    with pytest.raises(OutputError):
        with OutputDir(tmp_path, command="compare"):
            pytest.fail("the body must not run")
    assert (tmp_path / "thesis.txt").read_text() == "years of work"


def test_overwrite_writes_into_the_folder_and_keeps_other_files(tmp_path):
    (tmp_path / "thesis.txt").write_text("years of work")
    with OutputDir(tmp_path, command="compare", overwrite=True) as o:
        o.write_text("summary.md", "ropekit's summary")
    assert (tmp_path / "thesis.txt").read_text() == "years of work"
    assert (tmp_path / "summary.md").read_text() == "ropekit's summary"


def test_overwrite_never_replaces_a_same_named_user_file(tmp_path):
    (tmp_path / "summary.md").write_text("user's own summary")
    # refused by name before the job when the name is declared ...
    with pytest.raises(OutputError, match=r"^--out: .*summary\.md exists and was not written by ropekit"):
        check_output_dir(tmp_path, overwrite=True, names=["summary.md"])
    # ... and at the commit otherwise, before anything moves: the other file is not written either
    with pytest.raises(OutputError, match=r"summary\.md exists and was not written by ropekit"):
        with OutputDir(tmp_path, command="compare", overwrite=True) as o:
            o.write_text("a.png", "plot")
            o.write_text("summary.md", "ropekit's summary")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    assert (tmp_path / "summary.md").read_text() == "user's own summary"


def test_rerun_into_own_output_needs_no_overwrite_and_drops_only_its_stale_files(tmp_path):
    out = tmp_path / "r"
    with OutputDir(out, command="compare") as o:
        o.write_text("a.md", "1")
        o.write_text("passkey.png", "old plot")
    with OutputDir(out, command="eval ppl") as o:
        o.write_text("ppl.json", "{}")
    assert foreign_entries(out) == []
    with OutputDir(out, command="compare") as o:  # passkey skipped this time
        o.write_text("a.md", "2")
    assert (out / "a.md").read_text() == "2"
    assert not (out / "passkey.png").exists()  # compare's own stale output
    assert (out / "ppl.json").exists()  # another command's output is kept


def test_interrupted_run_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "r"
    with OutputDir(out, command="compare") as o:
        o.write_text("summary.md", "first")
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(out, command="compare") as o:
            o.write_text("summary.md", "second, half written")
            raise KeyboardInterrupt
    assert (out / "summary.md").read_text() == "first"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "summary.md"])  # no staging left


def test_failed_run_into_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with OutputDir(out, command="compare") as o:
            o.write_text("x", "y")
            raise RuntimeError("boom")
    assert not out.exists()


def test_dot_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"^--out: \. is not empty"):
        check_output_dir(".")
    with OutputDir(".", command="eval ppl", overwrite=True) as o:
        o.write_text("ppl.json", "{}")
    assert (tmp_path / "ppl.json").read_text() == "{}"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(f / "sub")


def test_json_onto_a_folder_or_an_existing_file(tmp_path):
    with pytest.raises(OutputError, match=r"^--json: .* is a folder; give a file name"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(".")
    existing = tmp_path / "r.json"
    existing.write_text("precious")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        check_output_file(existing)
    assert check_output_file(existing, overwrite=True) == existing
    assert check_output_file(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"


def test_write_file_atomic_mode_and_no_temporaries(tmp_path):
    p = write_file_atomic(tmp_path / "a" / "b.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(p) == 0o666 & ~umask
    assert [x.name for x in p.parent.iterdir()] == ["b.json"]


def test_recorded_files_count_as_ropekit_output_while_unchanged(tmp_path):
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-1" / "model.pt").write_text("w")
    (tmp_path / "training.json").write_text("{}")
    record(tmp_path, ["checkpoints/step-1/model.pt", "training.json"], "finetune")
    assert foreign_entries(tmp_path) == []
    # a recorded folder does not make everything in it ropekit's, and a changed file is the user's now
    (tmp_path / "checkpoints" / "user.txt").write_text("the user's")
    (tmp_path / "training.json").write_text('{"edited": true}')
    (tmp_path / "mine.txt").write_text("x")
    assert foreign_entries(tmp_path) == ["mine.txt", "training.json", "checkpoints/user.txt"]


def test_unwritable_parent_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="not writable"):
        check_output_dir(locked / "out")
