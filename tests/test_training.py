"""Fine-tuning: packing, no attention across documents, the loop, checkpoints and exact resume, LoRA, the CLI."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from ropekit import RopeConfig
from ropekit.training.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    block_causal_mask,
    document_ids,
    document_texts,
    pack_documents,
    packed_forward_kwargs,
    tokenize_documents,
)
from ropekit.training.finetune import FinetuneSettings, batch_indices, list_checkpoints, train

TRAINED = 32  # the tiny model's trained length
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def tiny_llama(seed: int = 0, attn: str = "sdpa", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                         rope_theta=10000.0, eos_token_id=256, bos_token_id=None, pad_token_id=None,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).to(dtype)


def patched(model, method="yarn", factor=4.0):
    from ropekit.hf import apply_rope

    cfg = RopeConfig.from_hf(model.config)
    if method != "default":
        cfg = cfg.with_method(method, factor=factor)
    return apply_rope(model, cfg)


@pytest.fixture(scope="module")
def text_rows():
    """Python-source documents packed at 128 bytes (4x the tiny model's trained length)."""
    docs = [p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))]
    return pack_documents(tokenize_documents(docs, ByteTokenizer()), 128)


# ---------------------------------------------------------------------- data
def test_pack_positions_restart_per_document_and_split_across_rows():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]]
    rows = pack_documents(docs, 4)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    # doc 2 starts at the end of row 0 and continues in row 1 as a new piece (positions restart).
    assert rows.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert rows.labels.tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 6, 7, 8],
                                    [IGNORE_INDEX, 10, 11, 12]]
    assert document_ids(rows.position_ids).tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert rows.predicted_tokens() == 8


def test_pack_drops_partial_row_and_rejects_too_little_data():
    rows = pack_documents([[1, 2, 3, 4, 5]], 2)
    assert rows.input_ids.shape == (2, 2)
    with pytest.raises(ValueError, match="data: only 3 tokens"):
        pack_documents([[1, 2, 3]], 4)
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([[1, 2, 3]], 1)


def test_tokenize_appends_eos():
    tok = ByteTokenizer()
    assert tokenize_documents(["ab", ""], tok) == [[97, 98, 256], [256]]
    assert tok.decode([104, 105, 256]) == "hi"


def test_load_documents_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}))
    (tmp_path / "skip.bin").write_text("not read")
    assert document_texts(tmp_path) == ["first", "second", "third"]
    with pytest.raises(FileNotFoundError, match="data: no such file or folder"):
        document_texts(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="data: folder .* has no text files"):
        document_texts(empty)
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="data: no non-empty documents"):
        document_texts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1 has no string field 'text'"):
        document_texts(bad)


def test_block_causal_mask_blocks_other_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    allowed = block_causal_mask(pos)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attn,explicit", [("sdpa", False), ("eager", False), ("sdpa", True), ("eager", True)])
def test_no_attention_across_documents(attn, explicit):
    """Changing document A's tokens leaves document B's logits unchanged; without packing it would not."""
    model = tiny_llama(attn=attn).eval()
    patch = patched(model)
    gen = torch.Generator().manual_seed(1)
    doc_a, doc_b = torch.randint(0, 256, (40,), generator=gen), torch.randint(0, 256, (50,), generator=gen)
    other_a = torch.randint(0, 256, (40,), generator=gen)
    pos = torch.cat((torch.arange(40), torch.arange(50)))[None]

    def logits_of_b(a, positions, packed=True):
        ids = torch.cat((a, doc_b))[None]
        kwargs = packed_forward_kwargs(positions, explicit_mask=explicit) if packed else {"position_ids": positions,
                                                                                           "use_cache": False}
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits[0, 40:]

    same = logits_of_b(doc_a, pos)
    changed = logits_of_b(other_a, pos)
    torch.testing.assert_close(same, changed, rtol=0, atol=1e-5)
    # B on its own (positions 0..49) gives the same logits: B saw only itself, at its own positions.
    with torch.no_grad():
        alone = model(input_ids=doc_b[None], use_cache=False).logits[0]
    torch.testing.assert_close(same, alone, rtol=1e-5, atol=1e-5)
    # Control: one continuous sequence does let A reach B, so the check above can fail.
    flat = torch.arange(90)[None]
    assert not torch.allclose(logits_of_b(doc_a, flat, packed=False), logits_of_b(other_a, flat, packed=False),
                              atol=1e-3)
    patch.remove()


def test_packed_rows_rotate_at_positions_restarting_per_document():
    """The second document of a packed row is rotated from position 0: its q/k equal an unpacked run's."""
    model = tiny_llama().eval()
    patch = patched(model, "linear", 2.0)
    seen = {}
    rotary = model.model.rotary_emb
    handle = rotary.register_forward_hook(lambda m, args, out: seen.setdefault(len(seen), out))
    ids = torch.randint(0, 256, (1, 30))
    pos = torch.cat((torch.arange(10), torch.arange(20)))[None]
    with torch.no_grad():
        model(input_ids=ids, **packed_forward_kwargs(pos))
        model(input_ids=ids[:, 10:], use_cache=False)
    handle.remove()
    cos_packed, cos_alone = seen[0][0][0, 10:], seen[1][0][0]
    torch.testing.assert_close(cos_packed, cos_alone, rtol=0, atol=0)
    patch.remove()


def test_batch_indices_cover_epochs_deterministically():
    a = torch.cat([batch_indices(s, 10, 4, seed=3) for s in range(5)])
    assert torch.equal(a, torch.cat([batch_indices(s, 10, 4, seed=3) for s in range(5)]))
    assert sorted(a[:10].tolist()) == list(range(10))  # the first epoch is a permutation
    assert sorted(a[10:20].tolist()) == list(range(10))


# ---------------------------------------------------------------------- the loop
def _held_out_loss(model, rows) -> float:
    with torch.no_grad():
        out = model(input_ids=rows.input_ids, labels=rows.labels, **packed_forward_kwargs(rows.position_ids))
    return float(out.loss)


def test_finetune_lowers_long_context_loss(text_rows):
    model = tiny_llama()
    patch = patched(model, "yarn", 4.0)
    held_out = text_rows.rows(range(len(text_rows) - 8, len(text_rows)))
    train_rows = text_rows.rows(range(len(text_rows) - 8))
    before = _held_out_loss(model.eval(), held_out)
    settings = FinetuneSettings(seq_len=128, steps=12, lr=3e-3, warmup=2, batch_size=4, grad_accum=2)
    result = train(model, train_rows, settings, progress=False)
    after = _held_out_loss(model, held_out)
    assert len(result.history) == 12 and result.final_step == 12
    assert after < before - 0.3, (before, after)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert [h["lr"] for h in result.history[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])  # warm-up, then flat
    patch.remove()


class Interrupted(Exception):
    pass


def _interrupt_at(step_index):
    def hook(step, model):
        if step == step_index:
            raise Interrupted(step)
    return hook


def _run(tmp, rows, steps, resume=False, lr=2e-3, lora=False, fingerprint=None, interrupt_at=None):
    model = tiny_llama(seed=5)
    patch = patched(model, "yarn", 4.0)
    if lora:
        from ropekit.training.finetune import add_lora

        model = add_lora(model, FinetuneSettings(seq_len=128, steps=1, lora=True, lora_rank=4))
    settings = FinetuneSettings(seq_len=128, steps=steps, lr=lr, warmup=3, batch_size=2, grad_accum=2,
                                checkpoint_every=2, lora=lora, lora_rank=4, gradient_checkpointing=True)
    fp = fingerprint or {"settings": settings.fingerprint(), "data": rows.fingerprint()}
    hook = None if interrupt_at is None else _interrupt_at(interrupt_at)
    try:
        result = train(model, rows, settings, out_dir=tmp, fingerprint=fp, resume=resume, progress=False,
                       after_backward=hook)
    finally:
        patch.remove()
    return model, result


def test_resume_after_checkpoint_matches_uninterrupted_run(tmp_path, text_rows):
    rows = text_rows.rows(range(24))
    full, full_result = _run(tmp_path / "full", rows, 5)
    with pytest.raises(Interrupted):  # killed during step 4, after the checkpoint at step 2
        _run(tmp_path / "split", rows, 5, interrupt_at=3)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-000002"]
    # The checkpoint at step 2 is what survives; the resumed run redoes steps 3 and 4 from it.
    resumed, resumed_result = _run(tmp_path / "split", rows, 5, resume=True)
    assert resumed_result.start_step == 2
    assert [h["loss"] for h in resumed_result.history] == pytest.approx(full_result.losses, rel=0, abs=1e-6)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-000004", "step-000005"]


def test_resume_refuses_other_configuration_and_existing_checkpoints(tmp_path, text_rows):
    rows = text_rows.rows(range(16))
    _run(tmp_path, rows, 2)
    with pytest.raises(ValueError, match=r"resume: .*different run configuration: settings\.lr: checkpoint 0\.002, "
                                         r"now 0\.001"):
        _run(tmp_path, rows, 4, resume=True, lr=1e-3)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        _run(tmp_path, rows, 4, resume=False)
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        _run(tmp_path / "fresh", rows, 4, resume=True)


def test_lora_trains_adapters_only_and_resumes(tmp_path, text_rows):
    rows = text_rows.rows(range(16))
    model, result = _run(tmp_path / "a", rows, 4, lora=True)
    base_before = tiny_llama(seed=5).state_dict()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = model.get_base_model()
    torch.testing.assert_close(base.model.layers[0].self_attn.q_proj.base_layer.weight,
                               base_before["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(Interrupted):
        _run(tmp_path / "b", rows, 4, lora=True, interrupt_at=2)
    resumed, resumed_result = _run(tmp_path / "b", rows, 4, lora=True, resume=True)
    assert resumed_result.losses == pytest.approx(result.losses, abs=1e-6)
    from ropekit.training.finetune import merge_lora

    merged = merge_lora(resumed)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_settings_validation():
    with pytest.raises(ValueError, match="steps: must be an integer >= 1"):
        FinetuneSettings(seq_len=128, steps=0)
    with pytest.raises(ValueError, match="lr: must be a finite number > 0"):
        FinetuneSettings(seq_len=128, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="strategy: 'tp' not accepted; accepted: ddp, fsdp"):
        FinetuneSettings(seq_len=128, steps=1, strategy="tp")
    with pytest.raises(ValueError, match="data: 2 rows of 128 tokens, fewer than one global batch"):
        rows = pack_documents([list(range(256))], 128)
        train(tiny_llama(), rows, FinetuneSettings(seq_len=128, steps=1, batch_size=4), progress=False)


# ---------------------------------------------------------------------- memory: the chunked loss
def tiny_gemma2(seed: int = 0):
    """A tiny Gemma 2: tied head and final-logit soft-capping, transforms the chunked loss must apply too."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=TRAINED,
                          final_logit_softcapping=2.0, eos_token_id=256, bos_token_id=None, pad_token_id=None,
                          attn_implementation="eager")
    return Gemma2ForCausalLM(config)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family,lora,checkpointing", [("llama", False, False), ("llama", False, True),
                                                       ("llama", True, True), ("gemma2", False, True)])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(family, lora, checkpointing, text_rows):
    """The loss the loop trains on (from hidden states, 7 positions per chunk, head recomputed in backward) equals
    the summed cross-entropy of the model's own full logits, and so do the gradients of every trainable weight."""
    from ropekit.training.finetune import add_lora, loss_forward, set_gradient_checkpointing, token_loss_sum

    model = tiny_llama(seed=3) if family == "llama" else tiny_gemma2(seed=3)
    patch = patched(model, "yarn", 4.0)
    if lora:
        model = add_lora(model, FinetuneSettings(seq_len=128, steps=1, lora=True, lora_rank=4))
        with torch.no_grad():  # peft starts B at zero; make the adapters count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    batch = text_rows.rows([0, 5])
    kwargs = packed_forward_kwargs(batch.position_ids)

    full = token_loss_sum(model(input_ids=batch.input_ids, **kwargs).logits, batch.labels)
    full.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    with loss_forward(model, chunk_size=7) as wrapped:  # 127 predicted positions: 18 chunks, the last short
        chunked = wrapped(input_ids=batch.input_ids, labels=batch.labels, **kwargs)
    chunked.backward()
    got = _grads(model)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    assert expected and set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # The override is gone afterwards: the model returns logits again.
    assert model(input_ids=batch.input_ids[:, :8], use_cache=False).logits.shape[-1] == 257
    set_gradient_checkpointing(model, False)
    patch.remove()


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """While active, records the shape of every non-parameter tensor autograd saves for backward (outside
    checkpointed regions: those keep only their inputs, through their own hooks)."""

    def __init__(self, model):
        self.shapes: list[tuple[int, ...]] = []
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.data_ptr() not in params:
                self.shapes.append(tuple(t.shape))
            return t

        super().__init__(pack, lambda t: t)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_step_keeps_no_logits_and_recomputes_every_patched_layer(checkpointing, text_rows):
    """During a real ``train`` step: nothing with a vocabulary axis is kept for backward, with gradient
    checkpointing nothing larger than one (batch, seq, hidden) tensor either, and every decoder layer of the
    RoPE-patched model runs twice (forward, then recomputed in backward) — once without checkpointing."""
    model = tiny_llama(seed=1)
    patch = patched(model, "yarn", 4.0)
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    settings = FinetuneSettings(seq_len=128, steps=1, lr=1e-3, warmup=1, batch_size=2,
                                gradient_checkpointing=checkpointing)
    saved = SavedForBackward(model)
    with saved:
        train(model, text_rows, settings, progress=False, loss_chunk=16)
    vocab, hidden, tokens = model.config.vocab_size, model.config.hidden_size, 2 * 128
    assert saved.shapes, "the hooks saw no forward"
    assert not [s for s in saved.shapes if s and s[-1] == vocab], "logits kept for backward"
    largest = max(math.prod(s) for s in saved.shapes)
    if checkpointing:
        assert largest <= tokens * hidden, sorted(saved.shapes, key=math.prod)[-5:]
        assert len(calls) == 2 * len(model.model.layers)
    else:
        assert largest > tokens * hidden  # control: the MLP's (tokens, intermediate) activations are kept
        assert len(calls) == len(model.model.layers)
    off = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else (
        model.is_gradient_checkpointing)
    assert not off  # train() turns checkpointing off again
    patch.remove()


def test_train_loss_is_the_models_own_loss_over_the_global_batch(text_rows):
    """Step 1's logged loss (chunked, 2 micro-batches x 2 rows) equals transformers' own mean token loss of the
    same 4 rows in one forward, before any update."""
    model = tiny_llama(seed=4)
    patch = patched(model, "yarn", 4.0)
    settings = FinetuneSettings(seq_len=128, steps=1, lr=1e-3, warmup=1, batch_size=2, grad_accum=2, seed=7)
    rows = text_rows.rows(batch_indices(0, len(text_rows), 4, seed=7))
    expected = _held_out_loss(model.eval(), rows)
    result = train(model, text_rows, settings, progress=False, loss_chunk=10)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert result.history[0]["tokens"] == rows.predicted_tokens()
    patch.remove()


def test_warns_when_the_run_ends_inside_the_warm_up(text_rows):
    rows = text_rows.rows(range(4))
    with pytest.warns(UserWarning, match=r"--steps 2 ends inside the 5-step warm-up \(--warmup\): the learning "
                                         r"rate peaks at 0\.0004 and never reaches --lr 0\.001"):
        result = train(tiny_llama(), rows, FinetuneSettings(seq_len=128, steps=2, lr=1e-3, warmup=5),
                       progress=False)
    assert len(result.warnings) == 1 and "never reaches --lr" in result.warnings[0]
    assert [h["lr"] for h in result.history] == pytest.approx([2e-4, 4e-4])
    # steps == warmup: the last step runs at --lr, so no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train(tiny_llama(), rows, FinetuneSettings(seq_len=128, steps=2, lr=1e-3, warmup=2),
                       progress=False)
    assert result.warnings == [] and result.history[-1]["lr"] == pytest.approx(1e-3)


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A saved tiny Llama (trained length 32) with a byte-level fast tokenizer, loadable by load_model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["</s>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    model = tiny_llama(seed=2)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for p in sorted((STDLIB / "json").glob("*.py"))[:3]:
        (folder / (p.stem + ".txt")).write_text(p.read_text())
    return folder


def _cli(args):
    """Run ``ropekit <args>`` with only this command registered (other commands may be mid-development)."""
    import typer
    from typer.testing import CliRunner

    from ropekit.commands import finetune as finetune_module

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    finetune_module.register(app)
    return CliRunner().invoke(app, args)


def test_cli_finetune_trains_evaluates_and_exports(tiny_model_folder, data_folder, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", str(tiny_model_folder), "--method", "yarn", "--factor", "4", "--seq-len", "128",
            "--data", str(data_folder), "--steps", "3", "--out", str(out), "--lr", "1e-3", "--warmup", "1",
            "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training.json").read_text())
    assert len(summary["history"]) == 3 and summary["rope"]["method"] == "yarn"
    assert summary["warnings"] == []  # 3 steps after a 1-step warm-up
    assert set(summary["evaluation"]["lengths"]) == {"32", "128"}  # trained length and --seq-len (JSON keys)
    assert "perplexity after fine-tuning" in result.output
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    assert exported.config.rope_parameters["rope_type"] == "yarn"
    assert (out / "training_curve.png").is_file()
    # Resuming the finished run with a different lr names what differs.
    again = _cli(args[:-1] + ["--resume", "--steps", "4", "--lr", "5e-4", "--no-export", "--no-progress"])
    assert again.exit_code != 0
    assert "settings.lr: checkpoint 0.001, now 0.0005" in again.output
    assert "Traceback" not in again.output


def test_cli_finetune_bad_input(tiny_model_folder, data_folder, tmp_path):
    base = ["finetune", str(tiny_model_folder), "--method", "linear", "--factor", "2", "--steps", "1",
            "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    short = _cli(base + ["--seq-len", "16", "--data", str(data_folder)])
    assert short.exit_code != 0
    assert "--seq-len: 16 is" in short.output and "trained length 32" in short.output
    empty = tmp_path / "empty"
    empty.mkdir()
    no_data = _cli(base + ["--seq-len", "64", "--data", str(empty)])
    assert no_data.exit_code != 0 and "has no text files" in no_data.output
    missing = _cli(base + ["--seq-len", "64", "--data", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no such file or folder" in missing.output
    assert "Traceback" not in short.output + no_data.output + missing.output


def test_cli_finetune_under_torchrun_matches_single_process(tiny_model_folder, data_folder, tmp_path):
    """`torchrun --nproc_per_node 2 -m ropekit.cli finetune ...` (gloo) trains the same steps as one process
    that accumulates the same global batch."""
    import os
    import socket
    import subprocess
    import sys

    common = ["finetune", str(tiny_model_folder), "--method", "linear", "--factor", "4", "--seq-len", "128",
              "--data", str(data_folder), "--steps", "2", "--lr", "1e-3", "--warmup", "3", "--device", "cpu",
              "--no-eval", "--no-export", "--no-progress", "--batch-size", "1"]
    single = _cli(common + ["--grad-accum", "2", "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "ropekit.cli", *common,
                           "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = json.loads((tmp_path / "single" / "training.json").read_text())
    two = json.loads((tmp_path / "ddp" / "training.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)
    assert [h["tokens"] for h in two["history"]] == [h["tokens"] for h in one["history"]]
    # 2 steps of a 3-step warm-up: the summary says the learning rate never reached --lr.
    for summary in (one, two):
        assert [w.split(":")[0] for w in summary["warnings"]] == ["--steps 2 ends inside the 3-step warm-up (--warmup)"]
