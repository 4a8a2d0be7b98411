"""Mixed context windows (LongRoPE2): each row rotates as at its own length, so a row whose positions stay below
the trained length L uses longrope's short factors and a row reaching position L uses the long ones."""

from __future__ import annotations

import pytest
import torch

from ropekit import RopeConfig
from ropekit.training.data import IGNORE_INDEX, PackedRows
from ropekit.training.finetune import FinetuneSettings, row_rope_length, train

TRAINED = 32  # L of the tiny model
SEQ = 2 * TRAINED
HALF = 8  # rotary pairs of the tiny model (head_dim 16)
SHORT = [1.0 + 0.1 * i for i in range(HALF)]
LONG = [2.0 + 0.5 * i for i in range(HALF)]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                         rope_theta=10000.0, eos_token_id=256, bos_token_id=None, pad_token_id=None,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.float64)


def longrope(model, short=SHORT, long=LONG) -> RopeConfig:
    return RopeConfig.from_hf(model.config).with_method("longrope", factor=2.0, short_factor=list(short),
                                                         long_factor=list(long))


def row(doc_lengths: list[int], seed: int) -> PackedRows:
    """One SEQ-token row packing documents of the given lengths (positions restart per document)."""
    assert sum(doc_lengths) == SEQ
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, SEQ), generator=gen)
    pos = torch.cat([torch.arange(n) for n in doc_lengths])[None]
    labels = ids.clone()
    labels[pos == 0] = IGNORE_INDEX
    return PackedRows(ids, pos, labels)


def two_rows() -> PackedRows:
    short = row([TRAINED, TRAINED], 1)  # last position L - 1: a short context
    long = row([TRAINED + 1, TRAINED - 1], 2)  # reaches position L: a long context
    return PackedRows(torch.cat((short.input_ids, long.input_ids)), torch.cat((short.position_ids, long.position_ids)),
                      torch.cat((short.labels, long.labels)))


def test_row_length_is_its_largest_position_plus_one():
    rows = two_rows()
    assert row_rope_length(rows.position_ids[:1]) == TRAINED
    assert row_rope_length(rows.position_ids[1:]) == TRAINED + 1


def _train_recording(mixed: bool, cfg_of=longrope, steps: int = 1, batch_size: int = 2):
    """Train on the two rows; returns (losses, [(length, inv_freq) resolved per forward])."""
    from ropekit.hf import apply_rope

    model = tiny_llama()
    cfg = cfg_of(model)
    seen = []
    with apply_rope(model, cfg) as patch:
        patch.fix_length(SEQ)  # as finetune does: the training length's scale
        frequencies = patch.rope.frequencies

        def recording(seq_len=None, device="cpu"):
            freqs = frequencies(seq_len, device)
            seen.append((seq_len, freqs.inv_freq64.clone()))
            return freqs

        patch.rope.frequencies = recording
        settings = FinetuneSettings(seq_len=SEQ, steps=steps, lr=1e-3, warmup=1, batch_size=batch_size,
                                    mixed_windows=mixed, gradient_checkpointing=False)
        result = train(model, two_rows(), settings, progress=False)
        del patch.rope.frequencies
        assert patch._fixed_length == SEQ  # put back after training
    return result.losses, seen


def test_rows_switch_to_long_factors_exactly_at_the_trained_length():
    _, seen = _train_recording(mixed=True)
    original = 10000.0 ** (-torch.arange(HALF, dtype=torch.float64) / HALF)  # base^(-2i/d), d = 16
    lengths = sorted(n for n, _ in seen)
    assert lengths == [TRAINED, TRAINED + 1]  # one forward per row, each at its own length
    for n, inv in seen:
        expected = original / torch.tensor(SHORT if n <= TRAINED else LONG, dtype=torch.float64)
        torch.testing.assert_close(inv, expected, rtol=1e-12, atol=0)


def test_without_mixed_windows_every_row_takes_the_long_factors():
    _, seen = _train_recording(mixed=False)
    assert {n for n, _ in seen} == {SEQ}


def test_one_row_per_forward_changes_no_number():
    """With short == long factors, mixed windows (one forward per row) train exactly as the batched loop."""
    same = lambda m: longrope(m, short=LONG, long=LONG)  # noqa: E731
    mixed, _ = _train_recording(mixed=True, cfg_of=same, steps=2)
    plain, _ = _train_recording(mixed=False, cfg_of=same, steps=2)
    assert mixed == pytest.approx(plain, rel=1e-12)
    differs, _ = _train_recording(mixed=True, steps=2)
    assert differs[0] != pytest.approx(mixed[0], rel=1e-6)  # short factors on the short row do change the loss


def test_mixed_windows_need_a_length_dependent_method():
    from ropekit.hf import apply_rope

    model = tiny_llama()
    cfg = RopeConfig.from_hf(model.config).with_method("yarn", factor=2.0)
    with apply_rope(model, cfg), pytest.raises(ValueError, match="mixed_windows: needs a model patched with a "
                                                                 "length-dependent RoPE method"):
        train(model, two_rows(), FinetuneSettings(seq_len=SEQ, steps=1, warmup=1, mixed_windows=True),
              progress=False)


def _cli(args):
    import typer
    from typer.testing import CliRunner

    from ropekit.commands import finetune as finetune_module

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    finetune_module.register(app)
    return CliRunner().invoke(app, args)


def test_cli_refuses_mixed_windows_for_a_static_method_and_context_parallel_without_torchrun(tiny_folder, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("some text " * 100)
    base = ["finetune", str(tiny_folder), "--seq-len", "128", "--data", str(data), "--steps", "1",
            "--out", str(tmp_path / "o")]
    mixed = _cli(base + ["--method", "yarn", "--factor", "2", "--mixed-windows"])
    assert mixed.exit_code == 2 and "--mixed-windows: needs a method whose rotation depends on the length" in mixed.output
    cp = _cli(base + ["--method", "yarn", "--factor", "2", "--context-parallel", "2"])
    assert cp.exit_code == 2 and "--context-parallel: 2 needs exactly 2 processes" in cp.output
    mode = _cli(base + ["--method", "yarn", "--factor", "2", "--cp-mode", "ring"])
    assert mode.exit_code == 2 and "--cp-mode: 'ring' not accepted; accepted: contiguous, zigzag" in mode.output
    assert not (tmp_path / "o").exists()
