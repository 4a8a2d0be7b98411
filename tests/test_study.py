"""The study: its pieces (data split, passkey prompts and scoring, sizes) and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from ropekit.training.data import ByteTokenizer
from ropekit.evaluation.passkey import FILLER, QUESTION, passkey_prompt
from ropekit.study import (
    ANSWER_LEN,
    KEY_DIGITS,
    MIN_PROMPT,
    QUICK,
    StudySizes,
    keys_correct,
    load_results,
    loss_spans,
    span_means,
    observations,
    passkey_ids,
    passkey_rows,
    pose_section,
    run_study,
    stdlib_files,
    summary_markdown,
)

TINY = dataclasses.replace(QUICK, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, train_len=256, factor=4,
                           pretrain_steps=4, pretrain_batch=4, finetune_steps=2, finetune_batch=1, eval_windows=1,
                           passkey_samples=2, max_files=20, search_budget=4, search_population=3, search_needles=2)


def test_passkey_rows_are_the_evaluation_prompt_without_instruction_plus_the_answer():
    tok = ByteTokenizer()
    for length in (MIN_PROMPT, 256, 1000):
        for depth in (0.0, 0.5, 1.0):
            ids = passkey_ids(length, depth, "40213")
            assert len(ids) == length
            text = tok.decode(ids)
            assert text.endswith(QUESTION + " 40213")
            assert text.count("The pass key is 40213. Remember it.") == 1
            assert "important info" not in text  # no instruction: it would not fit 256 bytes
            # The prompt part is exactly the evaluation's own prompt (one prompt builder for both).
            shared = passkey_prompt(tok, length - ANSWER_LEN, depth, "40213", instruction="")
            assert ids[:-ANSWER_LEN] == shared.input_ids.tolist()
    early, late = tok.decode(passkey_ids(1000, 0.1, "11111")), tok.decode(passkey_ids(1000, 0.9, "11111"))
    assert early.index("The pass key") < late.index("The pass key")
    assert FILLER.strip() in early
    with pytest.raises(ValueError, match="a passkey prompt needs at least"):
        passkey_ids(MIN_PROMPT - 1, 0.5, "12345")


def test_passkey_rows_have_random_keys_and_full_positions():
    rows = passkey_rows(4, 200, random.Random(0))
    assert rows.input_ids.shape == (4, 200)
    assert torch.equal(rows.position_ids[0], torch.arange(200))
    answers = {ByteTokenizer().decode(r[-ANSWER_LEN:].tolist()) for r in rows.input_ids}
    assert len(answers) > 1 and all(a[0] == " " and a[1:].isdigit() and len(a) == 1 + KEY_DIGITS for a in answers)


def test_keys_correct_scores_teacher_forced_argmax():
    ids = torch.tensor([[5, 6, 7, 9, 1, 2, 3, 4, 5], [5, 6, 7, 9, 1, 2, 3, 4, 5]])
    logits = torch.zeros(2, 9, 10)
    # Position t predicts token t+1: a perfect model puts its maximum on ids[t+1].
    logits[torch.arange(2)[:, None], torch.arange(8)[None], ids[:, 1:]] = 1.0
    assert keys_correct(logits, ids).tolist() == [True, True]
    logits[1, 5, ids[1, 6]] = 0.0
    logits[1, 5, 0] = 1.0  # one wrong digit fails the row
    assert keys_correct(logits, ids).tolist() == [True, False]
    logits[1, 5, 0] = 0.0
    logits[1, 5, ids[1, 6]] = 1.0
    logits[0, 2, ids[0, 3]] = 0.0  # the space before the key (ANSWER_LEN = 6 positions) counts too
    logits[0, 2, 0] = 1.0
    assert keys_correct(logits, ids).tolist() == [False, True]
    assert keys_correct(logits, ids, answer_len=5).tolist() == [True, True]


def test_stdlib_split_is_disjoint_and_stable():
    train_a, held_a = stdlib_files(50)
    train_b, held_b = stdlib_files(50)
    assert train_a == train_b and held_a == held_b
    assert len(train_a) == 50 and held_a
    assert not set(train_a) & set(held_a)


def test_sizes_validation_and_lengths():
    assert StudySizes().eval_lengths == [256, 512, 1024, 2048]
    assert dataclasses.replace(TINY, factor=4).eval_lengths == [256, 512, 1024]
    with pytest.raises(ValueError, match="factor: must be >= 2"):
        dataclasses.replace(TINY, factor=1)
    with pytest.raises(ValueError, match="kv_heads: must divide heads"):
        dataclasses.replace(TINY, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="train_len: must be >="):
        dataclasses.replace(TINY, train_len=64)
    with pytest.raises(ValueError, match=r"pose_window: must be 0 \(no PoSE run\) or in \[193, 1024\)"):
        dataclasses.replace(TINY, pose_window=1024)
    with pytest.raises(ValueError, match=r"pose_window: must be 0 \(no PoSE run\) or in \[193, 1024\)"):
        dataclasses.replace(TINY, pose_window=192)
    assert dataclasses.replace(TINY, pose_window=0).pose_window == 0


def _fake_results(explodes: bool) -> dict:
    lengths = [128, 256, 512]
    def entry(ppl, passkey=0.0):
        return {"ppl": dict(zip(lengths, ppl)), "passkey": {n: passkey for n in lengths}, "bucket_size": 32,
                "bucket_ppl": [1.0], "rope": {}}
    before = {"default": entry([4.0, 40.0 if explodes else 4.1, 90.0 if explodes else 4.2]),
              "linear": entry([5.0, 5.0, 5.1]), "yarn": entry([4.1, 4.3, 4.6])}
    after = {"default": entry([4.2, 6.0, 9.0]), "linear": entry([4.1, 4.2, 4.2]), "yarn": entry([4.1, 4.1, 4.1], 0.5)}
    hist = {m: [{"step": 1, "loss": 2.0 if m == "linear" else 1.5}, {"step": 2, "loss": 1.4}] for m in before}
    return {"sizes": dataclasses.asdict(dataclasses.replace(TINY, factor=4, finetune_steps=2)), "parameters": 1e5,
            "methods": ["default", "linear", "yarn"], "eval_lengths": lengths, "before": before, "after": after,
            "pretrain_history": [], "finetune_history": hist, "torch_threads": 2,
            "timings": {"total_s": 60, "pretrain_s": 30, "evaluate_before_s": 10, "finetune_and_evaluate_s": 20}}


def test_observations_follow_the_numbers():
    text = "\n".join(observations(_fake_results(explodes=True)))
    assert "90.000 at 4x" in text and "explodes past the trained length; seen here" in text
    assert "short contexts degrade; seen" in text
    assert "recovers after a few hundred steps; seen" in text
    assert "YaRN needs fewer steps for the same result; consistent here" in text
    partly = _fake_results(explodes=True)
    partly["after"]["linear"]["ppl"][128] = 4.5
    assert "partly seen: 50% of the short-context gap" in "\n".join(observations(partly))
    flat = "\n".join(observations(_fake_results(explodes=False)))
    assert "explodes past the trained length; NOT seen here" in flat
    md = summary_markdown(_fake_results(explodes=True))
    assert "| linear (PI) | 2.000 | 1.400 |" in md  # per-span means of the fine-tuning loss
    assert "| no scaling | 4.000 | 40.000 | 90.000 |" in md
    assert "| YaRN | 100% | 100% | 100% |" not in md and "| YaRN | 50% | 50% | 50% |" in md


def test_tiny_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    results = run_study(out, TINY, ("default", "linear", "yarn", "longrope"), progress=False, log=lambda *_: None)
    for name in ("summary.md", "results.json", "ppl_vs_position.png", "training_curves.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"] == ["default", "linear", "yarn", "longrope"]
    assert saved["eval_lengths"] == [256, 512, 1024]
    for stage in ("before", "after"):
        for method in saved["methods"]:
            ppl = saved[stage][method]["ppl"]
            assert set(ppl) == {"256", "512", "1024"}
            assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert len(saved["pretrain_history"]) == 4
    assert all(len(h) == 2 for h in saved["finetune_history"].values())
    # Fine-tuning changed each model: the "after" numbers are not the "before" ones.
    assert saved["after"]["yarn"]["ppl"]["1024"] != saved["before"]["yarn"]["ppl"]["1024"]
    # The same config gives the same evaluation before fine-tuning (no scaling = the pretrained model).
    md = (out / "summary.md").read_text()
    assert summary_markdown(load_results(out / "results.json")) == md  # the report is rebuilt from the JSON
    first = results["before"]["default"]["ppl"][256]
    assert f"| no scaling | {first:.3f} |" in md
    assert "Perplexity after fine-tuning" in md and "Passkey accuracy before fine-tuning" in md
    # PoSE: YaRN fine-tuned again on 256-byte windows with ids up to 1024, set beside its full-length run.
    pose = saved["pose"]
    assert pose["method"] == "yarn" and pose["window"] == 256
    assert len(pose["pose"]["history"]) == TINY.finetune_steps
    assert 0 < pose["pose"]["activation_bytes"] < pose["full"]["activation_bytes"]
    assert pose["full"]["ppl"] == saved["after"]["yarn"]["ppl"]
    assert pose["pose"]["ppl"]["1024"] != saved["after"]["yarn"]["ppl"]["1024"]
    assert "## PoSE vs full-length fine-tuning (YaRN, 2 steps each" in md
    # LongRoPE: factors searched on the pretrained model (budget 4 forwards), evaluated and fine-tuned like the rest.
    search = saved["search"]
    assert search["forwards"] <= TINY.search_budget and search["target_length"] == 1024
    assert set(search["seeds"]) >= {"yarn", "ntk", "pi"}
    rope = saved["before"]["longrope"]["rope"]
    assert rope["method"] == "longrope" and list(rope["long_factor"]) == search["long_factor"]
    assert all(a <= b for a, b in zip(search["long_factor"], search["long_factor"][1:]))
    # At the trained length LongRoPE rotates with its short factors (all 1): only the attention factor differs
    # from the unscaled model, so the two perplexities differ exactly when that factor is not 1.
    same = saved["before"]["longrope"]["ppl"]["256"] == saved["before"]["default"]["ppl"]["256"]
    assert same == (search["attention_factor"] == 1.0)
    assert "## LongRoPE factor search (1024 bytes, before fine-tuning)" in md
    assert "Searched LongRoPE vs YaRN at 4x, no fine-tuning" in md
    assert "| PoSE, window 256 | 256 bytes |" in md


def test_pose_section_follows_the_numbers():
    results = _fake_results(explodes=True)
    entry = lambda ppl, s, mib: {"ppl": {128: 4.0, 256: 4.0, 512: ppl}, "passkey": {128: 0.0, 256: 0.0, 512: 0.5},  # noqa: E731
                                 "train_s": s, "activation_bytes": mib * 2**20, "row_bytes": 0}
    results["before"]["yarn"]["ppl"][512] = 6.0
    results["pose"] = {"method": "yarn", "window": 128, "full": entry(4.0, 40.0, 100), "pose": entry(4.1, 10.0, 25)}
    text = "\n".join(pose_section(results))
    assert "ppl 6.000 before fine-tuning -> 4.100 (full length: 4.000) for 25% of the full-length training time " \
           "and 25% of its activation memory" in text
    assert text.endswith("(paper claim: PoSE reaches the full-length result at a fraction of the cost; seen).")
    results["pose"]["pose"]["ppl"][512] = 5.0
    assert "partly seen: 50% of the full-length gain" in "\n".join(pose_section(results))
    assert pose_section(_fake_results(explodes=True)) == []


def test_study_command_rejects_bad_sizes(tmp_path):
    import typer
    from typer.testing import CliRunner

    from ropekit.commands import study as study_module

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    study_module.register(app)
    result = CliRunner().invoke(app, ["study", "--quick", "--out", str(tmp_path), "--factor", "1"])
    assert result.exit_code != 0
    assert "--factor: must be >= 2" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["study", "--quick", "--out", str(tmp_path), "--methods", "yarn,rope2"])
    assert result.exit_code != 0 and "--methods: 'rope2' not accepted" in result.output
    result = CliRunner().invoke(app, ["study", "--quick", "--out", str(tmp_path), "--search-budget", "1"])
    assert result.exit_code != 0 and "--search-budget: must be an integer >= 2" in result.output


def test_loss_spans_cover_every_step():
    assert loss_spans(30) == [(1, 8), (9, 16), (17, 24), (25, 30)]
    assert loss_spans(2) == [(1, 1), (2, 2)]
    history = [{"step": i, "loss": float(i)} for i in range(1, 7)]
    assert span_means(history, loss_spans(6)) == [1.5, 3.5, 5.5]
