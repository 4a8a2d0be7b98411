"""A hostile or damaged output folder never makes ropekit touch a file it did not write (issue 21).

The manifest (``.ropekit-output.json``) is input from outside: planted entries that leave the folder, point
through symlinks, name the folder itself, or list files whose content changed, are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cli_checks import invoke, one_error_line
from ropekit.output import (
    MANIFEST,
    STAGING_PREFIX,
    Manifest,
    OutputDir,
    OutputError,
    check_output_dir,
    foreign_entries,
    read_manifest,
    record,
)

def plant(folder: Path, entries: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({"written_by": "ropekit 0.1.0", "version": 2, "entries": entries}))


def entry_for(path: Path, command: str = "inspect") -> dict:
    data = path.read_bytes()
    return {"command": command, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file and link under ``root`` with its content (links: their target)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
    return out


@pytest.fixture
def victim(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    (folder / "abs.txt").write_text("precious")
    return folder


# ---------------------------------------------------------------------- the reproduction, through the CLI
def test_planted_manifests_never_delete_outside_the_folder(tmp_path, victim, tiny_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Entries that hash-match the victims, so only the path checks stand between them and deletion.
    plant(tmp_path / "X", {"../victim/keep.txt": entry_for(victim / "keep.txt")})
    plant(tmp_path / "Y", {str(victim / "abs.txt"): entry_for(victim / "abs.txt")})
    plant(tmp_path / "Z", {".": {"command": "inspect", "size": 0, "sha256": "0" * 64}})
    before = snapshot(victim)
    config = tiny_folder / "config.json"
    for folder in ("X", "Y"):
        # the manifest fails its checks, so the folder holds a file ropekit did not write: refused without --overwrite
        line = one_error_line(invoke("inspect", config, "--out", folder), "--out")
        assert MANIFEST in line and "was ignored" in line
        result = invoke("inspect", config, "--out", folder, "--overwrite")
        assert result.exit_code == 0, result.output
    result = invoke("inspect", config, "--out", "Z", "--overwrite")
    assert result.exit_code == 0, result.output
    for folder in ("X", "Y", "Z"):
        for name in ("wavelengths.png", "decay.png"):
            assert (tmp_path / folder / name).is_file(), (folder, name)  # "wrote:" is the truth
        assert set(read_manifest(tmp_path / folder)) >= {"wavelengths.png", "decay.png"}
    assert snapshot(victim) == before


def test_symlink_entries_and_symlinked_folders_are_not_ropekits(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link.txt").symlink_to(victim / "keep.txt")
    (out / "sub").symlink_to(victim, target_is_directory=True)
    plant(out, {"link.txt": entry_for(victim / "keep.txt", "compare"),
                "sub/abs.txt": entry_for(victim / "abs.txt", "compare")})
    before = snapshot(victim)
    assert sorted(foreign_entries(out)) == ["link.txt", "sub"]
    with OutputDir(out, command="compare", overwrite=True) as o:
        o.write_text("summary.md", "new")  # the stale-removal pass sees both entries as compare's own
    assert snapshot(victim) == before
    assert (out / "link.txt").is_symlink() and (out / "sub").is_symlink()
    # writing through the symlinked folder is refused by name, before anything moves
    with pytest.raises(OutputError, match="sub is a symlink"):
        with OutputDir(out, command="compare", overwrite=True) as o:
            o.write_text("sub/new.txt", "x")
    assert snapshot(victim) == before


def test_a_changed_file_is_the_users_and_is_kept(tmp_path):
    out = tmp_path / "r"
    with OutputDir(out, command="compare") as o:
        o.write_text("summary.md", "ropekit's")
        o.write_text("old.png", "ropekit's plot")
    (out / "old.png").write_text("the user edited this")
    with pytest.raises(OutputError, match=r"old\.png"):
        check_output_dir(out)  # now a user's file: the folder needs --overwrite
    with OutputDir(out, command="compare", overwrite=True) as o:
        o.write_text("summary.md", "second run")  # old.png is stale compare output by name, but changed
    assert (out / "old.png").read_text() == "the user edited this"
    assert "old.png" not in read_manifest(out)


def test_an_older_manifest_without_checksums_is_ignored(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "summary.md").write_text("x")
    (out / MANIFEST).write_text(json.dumps({"written_by": "ropekit 0.1.0", "entries": {"summary.md": "compare"}}))
    with pytest.raises(OutputError, match="older ropekit"):
        check_output_dir(out)


def test_a_manifest_that_is_not_ropekits_is_never_replaced(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / MANIFEST).write_text("my own notes, not JSON")
    with pytest.raises(OutputError, match="ropekit will not replace it"):
        with OutputDir(out, command="compare", overwrite=True) as o:
            o.write_text("summary.md", "x")
    assert (out / MANIFEST).read_text() == "my own notes, not JSON"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


# ---------------------------------------------------------------------- the property
ENTRY_NAMES = st.sampled_from(["a.txt", "sub/b.txt", "../victim/keep.txt", "../victim", "..", ".", "",
                               "VICTIM_ABS", "link.txt", "linkdir/keep.txt", "sub/../../victim/keep.txt",
                               "sub//b.txt", "./a.txt", STAGING_PREFIX + "1-x/f", MANIFEST, "summary.md"])
LAYOUT = st.sampled_from(["plain", "link", "linkdir", "userfile", "summary"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(ENTRY_NAMES, max_size=6), layout=st.sets(LAYOUT), matching=st.booleans(),
       overwrite=st.booleans(), command=st.sampled_from(["compare", "inspect"]))
def test_random_manifests_never_touch_outside_and_never_lose_new_output(tmp_path_factory, names, layout, matching,
                                                                       overwrite, command):
    root = tmp_path_factory.mktemp("case")
    victim = root / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("a")
    (out / "sub" / "b.txt").write_text("b")
    if "link" in layout:
        (out / "link.txt").symlink_to(victim / "keep.txt")
    if "linkdir" in layout:
        (out / "linkdir").symlink_to(victim, target_is_directory=True)
    if "userfile" in layout:
        (out / "user.txt").write_text("the user's")
    if "summary" in layout:
        (out / "summary.md").write_text("the user's summary")
    entries = {}
    for name in names:
        key = str(victim / "keep.txt") if name == "VICTIM_ABS" else name
        if matching:  # the content the entry names, so only the path checks protect it
            target = victim / "keep.txt" if "victim" in key or name == "VICTIM_ABS" or "link" in key else out / "a.txt"
            entries[key] = entry_for(target, command) if target.is_file() else {"command": command, "size": 1,
                                                                                  "sha256": "0" * 64}
        else:
            entries[key] = {"command": command, "size": 3, "sha256": "f" * 64}
    plant(out, entries)
    outside = snapshot(victim)
    users = {k: v for k, v in snapshot(out).items() if k != MANIFEST}
    try:
        with OutputDir(out, command=command, overwrite=overwrite) as o:
            o.write_text("summary.md", "new summary")
            o.write_text("plots/p.png", "new plot")
        committed = True
    except OutputError:
        committed = False
    assert snapshot(victim) == outside
    after = snapshot(out)
    for rel, content in users.items():
        if rel in ("a.txt", "sub/b.txt") and not (rel in entries and matching):
            assert after.get(rel) == content, rel  # the user's files: never changed
        if rel in ("user.txt", "summary.md", "link.txt", "linkdir"):
            assert after.get(rel) == content, rel
    if committed:
        assert after["summary.md"] == b"new summary" and after["plots/p.png"] == b"new plot"
        assert set(read_manifest(out)) >= {"summary.md", "plots/p.png"}
    else:
        assert after == {**users, MANIFEST: after.get(MANIFEST)} and not any(k.startswith(STAGING_PREFIX)
                                                                            for k in after)


# ---------------------------------------------------------------------- finetune, export, staging, paths
def test_finetune_resume_on_a_user_folder_claims_nothing(tiny_folder, tmp_path, no_loading):
    folder = tmp_path / "F"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("the user's config")
    (folder / "training.json").write_text("the user's log")
    before = snapshot(folder)
    text = tmp_path / "t.txt"
    text.write_text("hello world. " * 400)
    args = ["finetune", tiny_folder, "--method", "yarn", "--factor", "2", "--seq-len", "128", "--data", text,
            "--steps", "1", "--out", folder]
    line = one_error_line(invoke(*args, "--resume"), "--")
    assert "model" in line or "checkpoint" in line
    assert snapshot(folder) == before  # no manifest written
    one_error_line(invoke(*args), "--out")
    line = one_error_line(invoke(*args, "--overwrite"), "--out")
    assert "model" in line and "did not write" in line
    assert snapshot(folder) == before


def test_finetune_checkpoints_are_recorded_and_planted_ones_ignored(tiny_folder, tmp_path):
    from ropekit.training.finetune import list_checkpoints

    text = tmp_path / "t.txt"
    text.write_text("hello world. " * 400)
    out = tmp_path / "run"
    args = ["finetune", tiny_folder, "--method", "yarn", "--factor", "2", "--seq-len", "128", "--data", text,
            "--steps", "2", "--checkpoint-every", "1", "--no-eval", "--no-progress", "--warmup", "1", "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert foreign_entries(out) == []
    # a checkpoint someone planted (with a manifest entry of its own hash, even) is neither listed nor read
    planted = out / "checkpoints" / "step-000009"
    planted.mkdir()
    (planted / "state.pt").write_bytes(b"not a checkpoint")
    (planted / "run.json").write_text("{}")
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002"]
    resume = [*args[:-2], "--steps", "3", "--out", out, "--resume"]
    line = one_error_line(invoke(*resume, "--overwrite"), "--out")  # ropekit would prune in a folder not all its own
    assert "step-000009/run.json" in line and "did not write" in line
    assert (planted / "state.pt").read_bytes() == b"not a checkpoint"  # kept
    (planted / "state.pt").rename(tmp_path / "state.pt")
    (planted / "run.json").unlink()
    resumed = invoke(*resume)
    assert resumed.exit_code == 0, resumed.output
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000003"]
    assert not any(STAGING_PREFIX in str(p) for p in out.rglob("*"))


def test_export_into_the_model_folder_is_refused(tiny_folder, tmp_path, no_loading):
    import shutil

    model = tmp_path / "my-model"
    shutil.copytree(tiny_folder, model)
    before = snapshot(model)
    line = one_error_line(invoke("export", model, "--method", "yarn", "--factor", "2", "--out", model,
                                 "--overwrite"), "--out")
    assert "model folder being read" in line
    assert snapshot(model) == before


def test_dangling_symlink_out_is_refused_before_work(tiny_folder, tmp_path, no_loading):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    line = one_error_line(invoke("export", tiny_folder, "--method", "yarn", "--factor", "2", "--out", link),
                          "--out")
    assert "does not exist" in line and link.is_symlink()


def test_user_folder_named_like_an_output_file_is_refused_before_anything_moves(tmp_path):
    out = tmp_path / "r"
    (out / "summary.md").mkdir(parents=True)
    (out / "summary.md" / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="a folder of that name is in the way"):
        with OutputDir(out, command="compare", overwrite=True) as o:
            o.write_text("a.csv", "1")
            o.write_text("summary.md", "2")
    assert snapshot(out) == {"summary.md/mine.txt": b"x"}


def test_a_user_folder_named_like_staging_is_kept(tmp_path):
    out = tmp_path / "r"
    staged = out / f"{STAGING_PREFIX}1-abc"  # pid 1 runs, but any pid: ropekit never removes it
    dead = out / f"{STAGING_PREFIX}999999999-abc"
    for folder in (staged, dead):
        folder.mkdir(parents=True)
        (folder / "mine.txt").write_text("x")
    with OutputDir(out, command="compare") as o:
        o.write_text("summary.md", "s")
    assert (staged / "mine.txt").read_text() == "x" and (dead / "mine.txt").read_text() == "x"


def test_out_root_is_refused_at_the_first_foreign_file(monkeypatch):
    calls = []
    real = os.scandir

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    with pytest.raises(OutputError, match=r"^--out: / is not empty"):
        check_output_dir("/")
    assert len(calls) <= 3  # no walk of the whole tree


def test_manifest_entries_are_validated(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    for bad in ("../a.txt", "/etc/passwd", ".", "", "a/../a.txt", "./a.txt", "a\\b", MANIFEST):
        plant(tmp_path, {bad: entry_for(tmp_path / "a.txt")})
        manifest = Manifest.load(tmp_path)
        assert manifest.entries == {} and manifest.problem, bad
    plant(tmp_path, {"a.txt": entry_for(tmp_path / "a.txt")})
    assert read_manifest(tmp_path) == {"a.txt": "inspect"}
    record(tmp_path, ["a.txt"], "compare")
    assert read_manifest(tmp_path) == {"a.txt": "compare"}


@pytest.mark.parametrize("state", ["planted", "damaged"])
def test_search_resume_reads_back_only_its_own_state(tiny_folder, tmp_path, no_loading, state):
    out = tmp_path / "s"
    out.mkdir()
    path = out / "search-state.json"
    if state == "planted":  # valid-looking JSON, not recorded by ropekit
        path.write_text(json.dumps({"version": 1, "generation": 0}))
    else:  # recorded, but not a search state
        path.write_text(json.dumps({"version": 99}))
        record(out, ["search-state.json"], "search")
    before = snapshot(out)
    line = one_error_line(invoke("search", tiny_folder, "--target-length", "128", "--out", out, "--resume"),
                          "--resume")
    assert "search-state.json" in line
    assert ("not written by ropekit" if state == "planted" else "version") in line
    assert snapshot(out) == before
