"""PoSE: skipped position ids (increasing, from 0, below N, covering every distance), the training loop runs the
window with those ids under plain causal attention, LoRA / accumulation / exact resume, and the CLI."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings as hyp_settings, strategies as st

from ropekit import RopeConfig
from ropekit.training.data import IGNORE_INDEX, ByteTokenizer, tokenize_documents
from ropekit.training.finetune import FinetuneSettings, list_checkpoints, train
from ropekit.training.pose import (
    PoseSpec,
    check_pose,
    covered_distances,
    pose_forward_kwargs,
    pose_position_ids,
    pose_windows,
    step_position_ids,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAINED = 32
TARGET = 128  # 4x the tiny model's trained length
WINDOW = 32


# ---------------------------------------------------------------------- the ids
@hyp_settings(max_examples=200, deadline=None)
@given(window=st.integers(2, 64), extra=st.integers(1, 500), chunks=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_position_ids_increase_from_zero_and_stay_below_target(window, extra, chunks, seed):
    target = window + extra
    chunks = min(chunks, window)
    ids = pose_position_ids(window, target, chunks, torch.Generator().manual_seed(seed))
    assert ids.dtype == torch.int64 and ids.shape == (window,)
    assert int(ids[0]) == 0
    assert bool((ids[1:] > ids[:-1]).all())
    assert int(ids[-1]) < target
    # At most `chunks` pieces of consecutive ids (a skip of 0 merges two pieces).
    assert int((torch.diff(ids) != 1).sum()) <= chunks - 1


def test_over_many_rows_every_distance_up_to_target_is_seen():
    gen = torch.Generator().manual_seed(0)
    target, window = 96, 8
    rows = torch.stack([pose_position_ids(window, target, 2, gen) for _ in range(4000)])
    assert covered_distances(rows).tolist() == list(range(1, target))
    # Without skips (plain windows) only distances below the window are seen.
    plain = torch.arange(window)[None]
    assert covered_distances(plain).tolist() == list(range(1, window))


def test_skips_really_vary_and_one_chunk_is_a_shifted_window():
    gen = torch.Generator().manual_seed(1)
    rows = torch.stack([pose_position_ids(16, 200, 2, gen) for _ in range(200)])
    assert len({int(r[-1]) for r in rows}) > 50  # the last id spreads over [15, 199]
    one = pose_position_ids(16, 200, 1, gen)
    assert one.tolist() == list(range(16))  # u_0 = 0: a single chunk is the plain window


def test_step_ids_depend_only_on_seed_and_step():
    spec = PoseSpec(target=TARGET, window=WINDOW)
    a = step_position_ids(spec, seed=3, step=7, rows=4)
    assert torch.equal(a, step_position_ids(spec, seed=3, step=7, rows=4))
    assert torch.equal(a[:2], step_position_ids(spec, seed=3, step=7, rows=2))  # slot order is stable
    assert not torch.equal(a, step_position_ids(spec, seed=3, step=8, rows=4))
    assert not torch.equal(a, step_position_ids(spec, seed=4, step=7, rows=4))


def test_check_pose_errors():
    with pytest.raises(ValueError, match="window: must be smaller than seq_len 64"):
        check_pose(64, 64)
    with pytest.raises(ValueError, match="window: must be >= 2"):
        check_pose(64, 1)
    with pytest.raises(ValueError, match=r"pose_chunks: must be in \[1, window=4\]"):
        check_pose(64, 4, 5)
    with pytest.raises(ValueError, match="window: PoSE needs a window length"):
        FinetuneSettings(seq_len=64, steps=1, pose=True)
    with pytest.raises(ValueError, match="window: only used with pose"):
        FinetuneSettings(seq_len=64, steps=1, window=16)


def test_pose_windows_are_consecutive_text():
    tokens = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    rows = pose_windows(tokens, 4)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert rows.labels[:, 0].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert rows.labels[:, 1:].tolist() == rows.input_ids[:, 1:].tolist()
    with pytest.raises(ValueError, match="fewer than one PoSE window of 20"):
        pose_windows(tokens, 20)


# ---------------------------------------------------------------------- training
def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                         rope_theta=10000.0, eos_token_id=256, bos_token_id=None, pad_token_id=None,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def patched(model, method="yarn", factor=4.0):
    from ropekit.hf import apply_rope

    cfg = RopeConfig.from_hf(model.config).with_method(method, factor=factor)
    patch = apply_rope(model, cfg)
    if cfg.length_dependent:
        patch.fix_length(TARGET)
    return patch


@pytest.fixture(scope="module")
def windows():
    docs = [p.read_text()[:4000] for p in sorted((STDLIB / "json").glob("*.py"))]
    return pose_windows(tokenize_documents(docs, ByteTokenizer()), WINDOW)


def pose_settings(**kw):
    base = dict(seq_len=TARGET, steps=2, lr=1e-3, warmup=1, pose=True, window=WINDOW, batch_size=2,
                gradient_checkpointing=False)
    return FinetuneSettings(**{**base, **kw})


def test_train_runs_the_window_at_the_skipped_ids_with_causal_attention(windows):
    """Step 1's loss equals the model's own loss on the same rows at the same PoSE ids with a plain causal mask:
    the ids reach the rotation and no skip is taken for a document boundary."""
    from ropekit.training.finetune import batch_indices

    settings = pose_settings(steps=1)
    model = tiny_llama(seed=1)
    reference = tiny_llama(seed=1)
    with patched(reference):
        index = batch_indices(0, len(windows), 2, settings.seed)
        rows = windows.rows(index)
        ids = step_position_ids(PoseSpec(TARGET, WINDOW), settings.seed, 0, 2)
        assert int(ids.max()) >= WINDOW  # the skips really take positions past the window
        with torch.no_grad():
            out = reference(input_ids=rows.input_ids, labels=rows.labels, **pose_forward_kwargs(ids))
        # transformers' loss is the mean over predicted tokens: the same normalisation as train()'s
        expected = float(out.loss)
        # Reading the skips as packed documents gives another loss: the test can tell them apart.
        with torch.no_grad():
            packed = reference(input_ids=rows.input_ids, labels=rows.labels, position_ids=ids, use_cache=False)
        assert abs(float(packed.loss) - expected) > 1e-4
    with patched(model):
        result = train(model, windows, settings, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_rows_must_be_windows(windows):
    model = tiny_llama()
    with patched(model), pytest.raises(ValueError, match="rows: packed at 32 tokens, settings.window is 16"):
        train(model, windows, pose_settings(window=16), progress=False)


class Interrupted(Exception):
    pass


def _run(tmp, rows, steps, resume=False, lora=False, interrupt_at=None, method="yarn"):
    model = tiny_llama(seed=5)
    patch = patched(model, method)
    settings = pose_settings(steps=steps, grad_accum=2, checkpoint_every=2, lora=lora, lora_rank=4, warmup=2,
                             gradient_checkpointing=True)
    if lora:
        from ropekit.training.finetune import add_lora

        model = add_lora(model, settings)

    def hook(step, m):
        if interrupt_at is not None and step == interrupt_at:
            raise Interrupted(step)

    fp = {"settings": settings.fingerprint(), "data": rows.fingerprint()}
    try:
        result = train(model, rows, settings, out_dir=tmp, fingerprint=fp, resume=resume, progress=False,
                       after_backward=hook)
    finally:
        patch.remove()
    return model, result


@pytest.mark.parametrize("lora", [False, True])
def test_pose_resume_is_exact(tmp_path, windows, lora):
    full, full_result = _run(tmp_path / "full", windows, 4, lora=lora)
    with pytest.raises(Interrupted):
        _run(tmp_path / "split", windows, 4, lora=lora, interrupt_at=2)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-000002"]
    resumed, resumed_result = _run(tmp_path / "split", windows, 4, lora=lora, resume=True)
    assert resumed_result.start_step == 2
    assert resumed_result.losses == pytest.approx(full_result.losses, rel=0, abs=1e-6)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_fingerprint_names_pose_only_when_used():
    plain = FinetuneSettings(seq_len=64, steps=1).fingerprint()
    assert "pose" not in plain and "window" not in plain and "mixed_windows" not in plain
    pose = FinetuneSettings(seq_len=64, steps=1, pose=True, window=16).fingerprint()
    assert pose["pose"] is True and pose["window"] == 16 and pose["pose_chunks"] == 2


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["</s>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(folder)
    tiny_llama(seed=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for p in sorted((STDLIB / "json").glob("*.py"))[:3]:
        (folder / (p.stem + ".txt")).write_text(p.read_text())
    return folder


def _cli(args):
    import typer
    from typer.testing import CliRunner

    from ropekit.commands import finetune as finetune_module

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    finetune_module.register(app)
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("method", ["yarn", "longrope"])
def test_cli_pose_trains_and_exports_a_plain_transformers_checkpoint(model_folder, data_folder, tmp_path, method):
    out = tmp_path / "run"
    args = ["finetune", str(model_folder), "--method", method, "--factor", "4", "--seq-len", str(TARGET),
            "--pose", "--window", "32", "--data", str(data_folder), "--steps", "2", "--out", str(out),
            "--lr", "1e-3", "--warmup", "1", "--device", "cpu", "--no-progress", "--eval-windows", "1"]
    if method == "longrope":  # searched factors: short ones (identity) up to the trained length, long ones beyond
        factors = tmp_path / "factors.json"
        factors.write_text(json.dumps({"short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]}))
        args += ["--factors-file", str(factors)]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training.json").read_text())
    assert summary["settings"]["pose"] is True and summary["settings"]["window"] == 32
    assert summary["rows_tokens"] == 32
    assert set(summary["evaluation"]["lengths"]) == {str(TRAINED), str(TARGET)}
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    assert exported.config.rope_parameters["rope_type"] == method
    with torch.no_grad():  # the plain transformers model runs at the target length
        logits = exported(input_ids=torch.randint(0, 256, (1, TARGET))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("extra, message", [
    (["--window", "128"], "--window: must be smaller than --seq-len 128"),
    (["--window", "1"], "--window: must be >= 2"),
    ([], "--window: PoSE needs a window length"),
    (["--window", "16", "--pose-chunks", "0"], "--pose-chunks: must be an integer >= 1"),
])
def test_cli_pose_bad_options_fail_before_loading(data_folder, tmp_path, extra, message):
    args = ["finetune", str(tmp_path / "no-such-model"), "--method", "yarn", "--factor", "4", "--seq-len", "128",
            "--pose", *extra, "--data", str(data_folder), "--steps", "1", "--out", str(tmp_path / "o")]
    result = _cli(args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_window_without_pose_is_refused(data_folder, tmp_path):
    result = _cli(["finetune", "x", "--method", "yarn", "--factor", "4", "--seq-len", "128", "--window", "16",
                   "--data", str(data_folder), "--steps", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--window: only used with --pose" in result.output
