"""The CLI never loses a user's files, refuses bad input before any model loads, and errs in one line."""

from __future__ import annotations

import json

import pytest
from cli_checks import invoke, one_error_line
from ropekit.cli import main
from ropekit.output import MANIFEST

@pytest.fixture
def user_dir(tmp_path):
    folder = tmp_path / "userdir"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    return folder


# ---------------------------------------------------------------------- a user's folder is refused, before any work
def _commands_into(tiny, text, folder):
    return {
        "eval ppl": ["eval", "ppl", tiny, "--method", "yarn", "--factor", "2", "--lengths", "64", "--data", text,
                     "--out", folder],
        "eval passkey": ["eval", "passkey", tiny, "--method", "yarn", "--factor", "2", "--lengths", "200",
                         "--out", folder],
        "eval needle": ["eval", "needle", tiny, "--method", "yarn", "--factor", "2", "--lengths", "200",
                        "--haystack", text, "--out", folder],
        "compare": ["compare", tiny, "--target-length", "512", "--needles", "2", "--data", text,
                    "--out", folder],
        "export": ["export", tiny, "--method", "yarn", "--factor", "2", "--out", folder],
        "finetune": ["finetune", tiny, "--method", "yarn", "--factor", "2", "--seq-len", "128", "--data", text,
                     "--steps", "1", "--out", folder],
        "inspect": ["inspect", tiny / "config.json", "--out", folder],
        "study": ["study", "--quick", "--out", folder],
    }


@pytest.mark.parametrize("command", ["eval ppl", "eval passkey", "eval needle", "compare", "export", "finetune",
                                     "inspect", "study"])
def test_a_folder_with_user_files_is_refused_before_work(command, tiny_folder, text_file, user_dir, no_loading,
                                                         monkeypatch):
    import ropekit.study

    monkeypatch.setattr(ropekit.study, "run_study", lambda *a, **k: pytest.fail("study ran"))
    args = _commands_into(tiny_folder, text_file, user_dir)[command]
    line = one_error_line(invoke(*args), "--out")
    assert "thesis.txt" in line and "--overwrite" in line
    assert sorted(p.name for p in user_dir.iterdir()) == ["thesis.txt"]
    assert (user_dir / "thesis.txt").read_text() == "years of work"


@pytest.mark.parametrize("command", ["eval ppl", "compare", "export", "finetune", "inspect"])
def test_overwrite_writes_beside_the_user_files(command, tiny_folder, text_file, user_dir):
    args = _commands_into(tiny_folder, text_file, user_dir)[command] + ["--overwrite"]
    if command == "finetune":
        args += ["--no-eval", "--no-progress", "--warmup", "1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (user_dir / "thesis.txt").read_text() == "years of work"
    assert (user_dir / MANIFEST).is_file()
    written = set(json.loads((user_dir / MANIFEST).read_text())["entries"])
    assert "thesis.txt" not in written and written
    # a second run into the same folder needs no --overwrite for ropekit's own files, and still keeps the user's
    if command in ("eval ppl", "inspect"):
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert (user_dir / "thesis.txt").read_text() == "years of work"


def test_rerun_into_own_report_needs_no_overwrite(tiny_folder, text_file, tmp_path):
    out = tmp_path / "report"
    args = ["eval", "ppl", tiny_folder, "--method", "yarn", "--factor", "2", "--lengths", "64", "--data",
            text_file, "--out", out]
    assert invoke(*args).exit_code == 0
    first = (out / "ppl.json").read_text()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (out / "ppl.json").read_text() == first  # same run, same numbers


def test_dot_as_out_is_refused_before_work(tiny_folder, text_file, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("eval", "ppl", tiny_folder, "--method", "yarn", "--factor", "2", "--lengths", "64",
                    "--data", text_file, "--out", ".")
    assert "is not empty" in one_error_line(result, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_dot_as_out_with_overwrite_writes_files_in_place(tiny_folder, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("eval", "ppl", tiny_folder, "--method", "yarn", "--factor", "2", "--lengths", "64",
                    "--data", text_file, "--out", ".", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ppl.json").is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ropekit-staging")]


@pytest.mark.parametrize("command", [
    ["eval", "ppl", "--method", "yarn", "--factor", "2", "--lengths", "64"],
    ["inspect"],
    ["bench", "--quick"],
])
def test_json_onto_a_folder_is_refused_before_work(command, tiny_folder, text_file, tmp_path, no_loading):
    args = list(command)
    if args[0] == "eval":
        args[2:2] = [tiny_folder]
        args += ["--data", text_file]
    elif args[0] == "inspect":
        args += [tiny_folder / "config.json", "--no-plots"]
    line = one_error_line(invoke(*args, "--json", tmp_path), "--json")
    assert "is a folder" in line


def test_interrupted_run_leaves_the_previous_report(tiny_folder, text_file, tmp_path, monkeypatch):
    import ropekit.evaluation.report as report

    out = tmp_path / "report"
    args = ["eval", "ppl", tiny_folder, "--method", "yarn", "--factor", "2", "--lengths", "64", "--data",
            text_file, "--out", out]
    assert invoke(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_bucket_ppl", interrupted)  # the last file of the report
    result = invoke(*args[:4], "ntk", *args[5:])
    assert result.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------- bad input: one line, before any load
BAD_INPUT = [
    (["eval", "ppl", "{tiny}", "--method", "yarnx", "--factor", "2", "--data", "{text}"], "--method"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "0.5", "--data", "{text}"], "--factor"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "nan", "--data", "{text}"], "--factor"),
    (["eval", "ppl", "{tiny}", "--method", "linear", "--factor", "2", "--beta-fast", "8", "--data", "{text}"],
     "--beta-fast"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "2", "--lengths", "-5,100", "--data", "{text}"],
     "--lengths"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "2", "--data", "{missing}"], "--data"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "2", "--data", "{empty}"], "--data"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "2", "--data", "{text}", "--device", "tpu"],
     "--device"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "2", "--data", "{text}", "--dtype", "float8"],
     "--dtype"),
    (["eval", "ppl", "{tiny}", "--method", "yarn", "--factor", "2", "--data", "{text}", "--windows", "-1"],
     "--windows"),
    (["eval", "passkey", "{tiny}", "--method", "yarn", "--factor", "2", "--depths", "1.5"], "--depths"),
    (["eval", "passkey", "{tiny}", "--method", "yarn", "--factor", "2", "--trials", "-1"], "--trials"),
    (["eval", "needle", "{tiny}", "--method", "yarn", "--factor", "2", "--haystack", "{missing}"], "--haystack"),
    (["eval", "needle", "{tiny}", "--method", "yarn", "--factor", "2", "--needle", "x"], "--question"),
    (["compare", "{tiny}", "--methods", "yarn,bogus", "--data", "{text}"], "--methods"),
    (["compare", "{tiny}", "--target-length", "32", "--data", "{text}"], "--target-length"),
    (["compare", "{tiny}", "--needles", "0", "--data", "{text}"], "--needles"),
    (["compare", "{tiny}", "--needles", "500", "--data", "{text}"], "--needles"),
    (["eval", "ruler", "{tiny}", "--method", "yarn", "--factor", "2", "--tasks", "niah,bogus"], "--tasks"),
    (["eval", "ruler", "{tiny}", "--method", "yarn", "--factor", "2", "--samples", "0"], "--samples"),
    (["compare", "{tiny}", "--windows", "0", "--data", "{text}"], "--windows"),
    (["export", "{tiny}", "--method", "dynamic_yarn", "--factor", "2", "--out", "{fresh}"], "--method"),
    (["export", "{tiny}", "--method", "base", "--out", "{fresh}"], "--new-base"),
    (["finetune", "{tiny}", "--method", "bogus", "--seq-len", "128", "--data", "{text}", "--steps", "1",
      "--out", "{fresh}"], "--method"),
    (["finetune", "{tiny}", "--method", "yarn", "--factor", "2", "--seq-len", "32", "--data", "{text}",
      "--steps", "1", "--out", "{fresh}"], "--seq-len"),
    (["finetune", "{tiny}", "--method", "yarn", "--factor", "2", "--seq-len", "128", "--data", "{empty}",
      "--steps", "1", "--out", "{fresh}"], "--data"),
    (["finetune", "{tiny}", "--method", "yarn", "--factor", "2", "--seq-len", "128", "--data", "{text}",
      "--steps", "0", "--out", "{fresh}"], "--steps"),
    (["finetune", "{tiny}", "--method", "yarn", "--factor", "2", "--seq-len", "128", "--data", "{text}",
      "--steps", "1", "--out", "{fresh}", "--eval-data", "{missing}"], "--eval-data"),
    (["bench", "--dtypes", "float8"], "--dtypes"),
    (["bench", "--shapes", "huge"], "--shapes"),
    (["study", "--methods", "yarn,bogus", "--out", "{fresh}"], "--methods"),
    (["study", "--factor", "1", "--out", "{fresh}"], "--factor"),
]


@pytest.mark.parametrize("args, option", BAD_INPUT, ids=[" ".join(a[:2]) + " " + o for a, o in BAD_INPUT])
def test_bad_input_is_one_line_before_any_load(args, option, tiny_folder, text_file, tmp_path, no_loading,
                                               monkeypatch):
    import ropekit.kernels.bench
    import ropekit.study

    monkeypatch.setattr(ropekit.study, "run_study", lambda *a, **k: pytest.fail("study ran"))
    monkeypatch.setattr(ropekit.kernels.bench, "run", lambda *a, **k: pytest.fail("bench ran"))
    (tmp_path / "empty").mkdir()
    values = {"tiny": tiny_folder, "text": text_file, "missing": tmp_path / "missing.txt",
              "empty": tmp_path / "empty", "fresh": tmp_path / "fresh"}
    result = invoke(*[a.format(**values) for a in args])
    one_error_line(result, option)
    assert not (tmp_path / "fresh").exists()


def test_config_without_weights_is_one_line(tmp_path, no_loading, text_file):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    from tiny import make_tiny_config

    make_tiny_config("llama").save_pretrained(folder)
    for args in (["eval", "ppl", folder, "--method", "yarn", "--factor", "2", "--data", text_file],
                 ["export", folder, "--method", "yarn", "--factor", "2", "--out", tmp_path / "out"]):
        line = one_error_line(invoke(*args), "")
        assert "weights" in line and str(folder) in line


def test_gguf_that_is_not_gguf_is_one_line(tmp_path, no_loading, text_file):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    line = one_error_line(invoke("eval", "ppl", fake, "--method", "yarn", "--factor", "2", "--data", text_file), "")
    assert "GGUF" in line


# ---------------------------------------------------------------------- usage errors through the real entry point
@pytest.mark.parametrize("argv, fragment", [
    (["study", "--quick", "true"], "--quick"),
    (["eval", "ppl", "--windows", "abc"], "--windows"),
    (["eval", "ppl", "--lengths"], "--lengths"),
    (["bogus"], "bogus"),
])
def test_usage_errors_are_one_line_with_exit_2(argv, fragment, capsys, no_loading):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_flags_show_no_value_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--quick" in help_text and "<bool>" not in help_text
