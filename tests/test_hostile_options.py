"""Hostile option values are refused in one line (``error: --option: ...``, exit 2) before any weights load.

Non-finite floats, empty lists, a YaRN attention scale that is not positive, lengths the text or the machine cannot
supply, a comparison in which every method would be skipped, library field names instead of flags, and a
boolean word where the MODEL goes (``--overwrite true``).
"""

from __future__ import annotations

import math

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import cli_checks
import ropekit.hf
import ropekit.hf.load
from cli_checks import invoke
from ropekit.cli import build_app

FIXTURES = [HealthCheck.function_scoped_fixture]


def one_error_line(result, option: str) -> str:
    """The one stderr line of a usage error naming ``option`` (as typed: ``--lengths``, ``MODEL``)."""
    return cli_checks.one_error_line(result, f"{option}:")





@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text("".join(f"Line {i}: a stitch in time saves nine.\n" for i in range(400)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ten_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("short") / "ten.txt"
    path.write_bytes(b"short text")
    return path


# ---------------------------------------------------------------------- 1. non-finite floats
NON_FINITE = st.one_of(
    st.sampled_from(["nan", "NaN", "-nan", "inf", "+inf", "-inf", "Infinity", "-Infinity", "INF"]),
    st.integers(min_value=309, max_value=4000).map(lambda e: f"1e{e}"),  # overflows to inf
    st.integers(min_value=309, max_value=4000).map(lambda e: f"-2.5e{e}"),
)


def _is_float_option(param) -> bool:
    kind = getattr(param, "type", None)  # click's FLOAT (older typer), else typer's own type descriptor
    if kind is not None and getattr(kind, "name", None) == "float":
        return True
    return getattr(getattr(param, "type_descriptor", None), "annotation", None) is float


def _float_options() -> list[tuple[tuple[str, ...], str]]:
    """(command path, flag) of every float option of every command."""
    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, path + (name,))
        else:
            for param in command.params:
                if _is_float_option(param):
                    yield path, next(o for o in param.opts if o.startswith("--"))

    return sorted(walk(typer.main.get_command(build_app()), ()))


FLOAT_OPTIONS = _float_options()


def _required(path: tuple[str, ...], tiny, text, tmp) -> list:
    """What each command needs besides the option under test (parsing must get as far as the command)."""
    needs = {
        ("search",): [tiny, "--target-length", 128, "--out", tmp / "search"],
        ("finetune",): [tiny, "--method", "yarn", "--seq-len", 128, "--data", text, "--steps", 1,
                        "--out", tmp / "finetune"],
        ("export",): [tiny, "--method", "yarn", "--out", tmp / "export"],
        ("study",): ["--out", tmp / "study"],
        ("eval", "ppl"): [tiny], ("eval", "passkey"): [tiny], ("eval", "needle"): [tiny], ("eval", "ruler"): [tiny],
    }
    assert path in needs, f"a new command with float options: add it here: {path}"
    return list(path) + needs[path]


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(option=st.sampled_from(FLOAT_OPTIONS), value=NON_FINITE)
def test_a_non_finite_float_is_refused_by_every_float_option(option, value, tiny_folder, text_file, tmp_path,
                                                             no_loading):
    assert {"--tolerance", "--text-weight", "--short-tolerance", "--max-factor", "--lr", "--max-grad-norm",
            "--factor", "--beta-fast", "--attention-factor", "--mscale", "--pretrain-lr"} <= {
        flag for _, flag in FLOAT_OPTIONS}  # the enumeration finds them all
    path, flag = option
    line = one_error_line(invoke(*_required(path, tiny_folder, text_file, tmp_path), flag, value), flag)
    assert "finite" in line
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flag", ["--tolerance", "--text-weight", "--short-tolerance"])
def test_search_guard_options_refuse_nan(flag, tiny_folder, tmp_path, no_loading):
    result = invoke("search", tiny_folder, "--target-length", 1024, "--out", tmp_path / "s", "--search-attention",
                    flag, "nan")
    assert one_error_line(result, flag) == f"error: {flag}: must be a finite number, got nan"
    assert not (tmp_path / "s").exists()  # no search state holds a NaN


def test_library_search_guard_refuses_nan():
    from ropekit.search.fitness import NeedleFitness

    cfg = ropekit.RopeConfig(head_dim=16, original_max_position=64, max_position=64)
    for name in ("tolerance", "short_tolerance", "text_weight"):
        with pytest.raises(ValueError, match=rf"^{name}: must be a finite number >= 0"):
            NeedleFitness(None, None, cfg, 128, **{name: math.nan})


# ---------------------------------------------------------------------- 2. empty lists
@pytest.mark.parametrize("command", ["ppl", "passkey", "needle", "ruler"])
def test_empty_lengths_is_refused_not_the_default(command, tiny_folder, no_loading):
    line = one_error_line(invoke("eval", command, tiny_folder, "--factor", 2, "--lengths", ""), "--lengths")
    assert "''" in line


@pytest.mark.parametrize("args", [["eval", "ppl", "--data"], ["eval", "needle", "--haystack"],
                                  ["compare", "--data"]])
def test_empty_data_path_is_refused_not_the_current_folder(args, tiny_folder, no_loading, tmp_path):
    command, option = args[:-1], args[-1]
    extra = ["--factor", 2] if command[0] == "eval" else ["--out", tmp_path / "r"]
    line = one_error_line(invoke(*command, tiny_folder, *extra, option, ""), option)
    assert "empty path" in line


# ---------------------------------------------------------------------- 3. the resolved attention scale
def test_mscale_giving_a_negative_attention_scale_is_refused(tiny_folder, text_file, no_loading):
    result = invoke("eval", "ppl", tiny_folder, "--method", "yarn", "--factor", 2, "--mscale", -100,
                    "--mscale-all-dim", 1, "--lengths", 64, "--data", text_file)
    line = one_error_line(result, "--mscale, --mscale-all-dim")
    assert "-5.547" in line and "positive" in line and "mscale_all_dim" not in line


@settings(max_examples=50, deadline=None)
@given(mscale=st.floats(-1e3, 1e3), all_dim=st.floats(-1e3, 1e3), factor=st.floats(1.0, 1e4),
       method=st.sampled_from(["yarn", "dynamic_yarn"]))
def test_a_yarn_config_that_validates_has_a_positive_finite_attention_scale(mscale, all_dim, factor, method):
    from ropekit.methods import frequencies

    base = ropekit.RopeConfig(head_dim=16, original_max_position=64, max_position=64)
    try:
        cfg = base.extend(method, factor, mscale=mscale, mscale_all_dim=all_dim)
    except ValueError as exc:
        assert str(exc).startswith("mscale, mscale_all_dim:"), exc
        return
    scale = frequencies(cfg, cfg.target_length).attention_scale
    assert math.isfinite(scale) and scale > 0


def test_frequencies_refuse_a_scale_that_is_not_positive():
    import torch

    from ropekit.methods import Frequencies

    for scale in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="^attention_scale: must be a positive finite number"):
            Frequencies(inv_freq64=torch.ones(4), attention_scale=scale)


# ---------------------------------------------------------------------- 4. lengths the text or the machine cannot supply
def test_a_length_beyond_the_default_text_is_refused_before_the_load(tiny_folder, no_loading):
    line = one_error_line(invoke("eval", "ppl", tiny_folder, "--factor", 2, "--lengths", 1_000_000_000), "--lengths")
    assert "1000000000 tokens needed" in line and "at most" in line


def test_compare_target_beyond_the_text_is_refused_before_the_load(tiny_folder, tmp_path, no_loading):
    line = one_error_line(invoke("compare", tiny_folder, "--target-length", 1_000_000_000, "--out", tmp_path / "r"),
                          "--target-length")
    assert "tokens needed" in line and "at most" in line
    assert not (tmp_path / "r").exists()


def test_search_target_beyond_the_text_is_refused_before_the_load(tiny_folder, tmp_path, no_loading):
    line = one_error_line(invoke("search", tiny_folder, "--target-length", 1_000_000_000, "--out", tmp_path / "s"),
                          "--target-length")
    assert "tokens needed" in line


@pytest.mark.parametrize("command", ["ppl", "needle", "ruler", "compare", "search"])
def test_a_ten_byte_text_is_refused_before_the_load(command, tiny_folder, ten_bytes, tmp_path, no_loading):
    args = {"ppl": ["eval", "ppl", tiny_folder, "--factor", 2, "--lengths", 64, "--data", ten_bytes],
            "needle": ["eval", "needle", tiny_folder, "--factor", 2, "--lengths", 400, "--haystack", ten_bytes],
            "ruler": ["eval", "ruler", tiny_folder, "--factor", 2, "--lengths", 400, "--data", ten_bytes],
            "compare": ["compare", tiny_folder, "--needles", 2, "--data", ten_bytes, "--out", tmp_path / "r"],
            "search": ["search", tiny_folder, "--target-length", 1024, "--needles", 1, "--data", ten_bytes,
                       "--out", tmp_path / "s"]}[command]
    option = "--haystack" if command == "needle" else "--data"
    line = one_error_line(invoke(*args), option)
    assert "tokens needed" in line and "10 bytes" in line


def test_the_second_file_of_a_folder_is_checked_before_the_load(tiny_folder, text_file, tmp_path, no_loading):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(text_file.read_text())
    (folder / "b.txt").write_bytes(b"\xff\xfe not UTF-8")
    line = one_error_line(invoke("eval", "ppl", tiny_folder, "--factor", 2, "--lengths", 64, "--data", folder),
                          "--data")
    assert "b.txt" in line and "UTF-8" in line
    (folder / "b.txt").write_text("too short")
    line = one_error_line(invoke("eval", "ppl", tiny_folder, "--factor", 2, "--lengths", 64, "--windows", 2,
                                 "--data", folder), "--data")
    assert "2 documents of 64 tokens needed" in line


def test_a_length_no_machine_holds_is_refused_before_the_load(tiny_folder, no_loading):
    line = one_error_line(invoke("eval", "passkey", tiny_folder, "--factor", 2, "--lengths", 10**13), "--lengths")
    assert "of memory" in line and "at most" in line


@pytest.mark.parametrize("command", ["passkey", "needle", "ruler"])
def test_a_length_too_short_for_a_prompt_is_refused_before_the_load(command, tiny_folder, text_file, no_loading):
    """Refused with the tokenizer alone, naming --lengths (the library's ``length: ...`` restated)."""
    extra = {"passkey": [], "needle": ["--haystack", text_file],
             "ruler": ["--tasks", "niah_single", "--data", text_file]}[command]
    line = one_error_line(invoke("eval", command, tiny_folder, "--factor", 2, "--lengths", 10, *extra), "--lengths")
    assert "got 10" in line or "too short" in line


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5), length=st.integers(2, 400),
       count=st.integers(1, 3), joined=st.booleans())
def test_check_supply_refuses_exactly_what_the_run_would(sizes, length, count, joined, tmp_path_factory):
    """With a tokenizer of one token per byte, the check refuses exactly when the run's own cut would fail."""
    from tiny import byte_tokenizer

    from ropekit.evaluation.data import check_supply, concatenated_tokens, load_documents, token_windows

    folder = tmp_path_factory.mktemp("docs")
    for i, size in enumerate(sizes):
        (folder / f"{i}.txt").write_text("x" * size)
    tokenizer = _byte_tokenizer(byte_tokenizer)
    try:
        if joined:
            concatenated_tokens(load_documents(folder), tokenizer, length)
        else:
            assert len(token_windows(load_documents(folder), tokenizer, length, count)) >= count
        runs = True
    except (ValueError, AssertionError):
        runs = False
    try:
        check_supply(folder, length, count=1 if joined else count, joined=joined, tokenizer=lambda: tokenizer)
        accepted = True
    except ValueError as exc:
        assert "tokens needed" in str(exc)
        accepted = False
    assert accepted == runs


_TOKENIZER = []


def _byte_tokenizer(build):
    if not _TOKENIZER:
        _TOKENIZER.append(build())
    return _TOKENIZER[0]


# ---------------------------------------------------------------------- 5. a comparison with nothing to compare
@pytest.mark.parametrize("methods", ["longrope", "default", "longrope,default"])
def test_compare_refuses_methods_that_would_all_be_skipped(methods, tiny_folder, tmp_path, no_loading):
    line = one_error_line(invoke("compare", tiny_folder, "--methods", methods, "--out", tmp_path / "r"), "--methods")
    if "longrope" in methods:
        assert "--factors-file" in line and "ropekit search" in line
    assert "baseline" in line
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- 6. flags, not field names
@pytest.mark.parametrize("command", ["eval", "export", "finetune"])
def test_a_missing_factors_file_names_the_flag(command, tiny_folder, text_file, tmp_path, no_loading):
    common = ["--method", "longrope", "--factor", 2, "--factors-file", tmp_path / "missing.json"]
    args = {"eval": ["eval", "ppl", tiny_folder, *common, "--lengths", 64, "--data", text_file],
            "export": ["export", tiny_folder, *common, "--out", tmp_path / "ex"],
            "finetune": ["finetune", tiny_folder, *common, "--seq-len", 128, "--data", text_file, "--steps", 1,
                         "--out", tmp_path / "ft"]}[command]
    assert "missing.json" in one_error_line(invoke(*args), "--factors-file")


def test_study_learning_rates_name_the_flag_before_training(monkeypatch, tmp_path):
    import ropekit.study

    monkeypatch.setattr(ropekit.study, "run_study", lambda *a, **k: pytest.fail("study ran"))
    for flag in ("--pretrain-lr", "--finetune-lr"):
        one_error_line(invoke("study", "--quick", "--out", tmp_path / "st", flag, -1), flag)


def test_a_missing_factor_suggests_no_option_the_command_lacks(tiny_folder, no_loading):
    line = one_error_line(invoke("eval", "ppl", tiny_folder, "--method", "yarn", "--lengths", 64), "--factor")
    assert "target_length" not in line


# ---------------------------------------------------------------------- 7. a boolean word where MODEL goes
@pytest.fixture
def no_lookup(monkeypatch, no_loading):
    """Fail the test if the MODEL is looked up (files, config, hub)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was looked up")

    monkeypatch.setattr(ropekit.hf.load, "rope_from_source", refuse)
    monkeypatch.setattr(ropekit.hf.load, "read_model_config", refuse)
    monkeypatch.setattr(ropekit.hf, "check_model_source", refuse)


def test_overwrite_true_is_not_a_model(no_lookup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke("compare", "--overwrite", "true"), "MODEL")
    assert line == ("error: MODEL: 'true' is not a model (a folder, a .gguf file, a hub id or 'demo'); flags take "
                    "no value (--overwrite, not --overwrite true)")


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES)
@given(word=st.sampled_from(["true", "false", "yes", "no", "on", "off", "1", "0"]).flatmap(
           lambda w: st.sampled_from([w, w.upper(), w.capitalize()])),
       command=st.sampled_from([["compare", "--overwrite"], ["eval", "ppl", "--no-baseline"],
                                ["eval", "passkey", "--overwrite"], ["inspect", "--no-plots"]]))
def test_a_boolean_word_after_a_flag_is_not_a_model(word, command, no_lookup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    line = one_error_line(invoke(*command, word), "MODEL")
    assert f"'{word}' is not a model" in line and f"({command[-1]}, not {command[-1]} {word})" in line


def test_finetune_refuses_a_seq_len_the_text_or_machine_cannot_supply_before_loading(tiny_folder, tmp_path,
                                                                                      monkeypatch):
    import ropekit.hf
    from typer.testing import CliRunner

    from ropekit.cli import build_app

    monkeypatch.setattr(ropekit.hf, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    short = tmp_path / "ten.txt"
    short.write_text("0123456789")
    base = ["finetune", str(tiny_folder), "--method", "yarn", "--factor", "2", "--steps", "1"]
    for extra, option in ((["--seq-len", "128", "--data", str(short)], "--data"),
                          (["--seq-len", "1000000000000", "--data", str(short)], "--seq-len")):
        result = CliRunner().invoke(build_app(), base + extra + ["--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert not (tmp_path / "o").exists()
