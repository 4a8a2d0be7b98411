"""`ropekit.analysis` and `ropekit inspect`: wavelengths, per-method views, RoFormer's decay bound, plots."""

from __future__ import annotations

import cmath
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from ropekit import RopeConfig
from ropekit.analysis import decay_curve, inspect_rope, method_configs, plot_decay, plot_wavelengths

PNG = b"\x89PNG\r\n\x1a\n"


def _smollm2_like():
    return RopeConfig(head_dim=64, base=1e5, original_max_position=8192, max_position=8192)


def test_pairs_turned_in_training_follow_from_the_wavelengths():
    report = inspect_rope(_smollm2_like(), 16384)
    # lambda_i = 2 pi b^(2i/d) <= L  <=>  i <= (d/2) ln(L / 2 pi) / ln(b) = 19.94 for d=64, b=1e5, L=8192.
    bound = 32 * math.log(8192 / (2 * math.pi)) / math.log(1e5)
    assert report.pairs_turned == math.floor(bound) + 1 == 20
    assert report.pairs_never_turned == 12
    assert report.factor == 2.0
    assert report.wavelengths[0].item() == pytest.approx(2 * math.pi)
    d = report.to_dict()
    assert d["turns_in_training"][0] == pytest.approx(8192 / (2 * math.pi))
    assert d["pairs_turned_in_training"] == 20


def test_method_views_match_the_reference_numbers():
    # YaRN reference values (reference.md): d=128, b=1e4, L=2048 -> ramp over pairs [16, 41]; s=8 -> 1.2079.
    cfg = RopeConfig(head_dim=128, base=1e4, original_max_position=2048, max_position=2048)
    views = {v.name: v for v in inspect_rope(cfg, 8 * 2048).methods}
    assert views["yarn"].pairs_kept == 17  # pairs 0..16 keep their speed
    assert views["yarn"].pairs_interpolated == 64 - 41  # pairs 41..63 are slowed by the full factor
    assert views["yarn"].attention_scale == pytest.approx(1.2079, abs=1e-4)
    assert (views["linear"].pairs_kept, views["linear"].pairs_interpolated) == (0, 64)
    assert views["default"].pairs_kept == 64 and views["default"].attention_scale == 1.0
    # llama3: wavelength < L/4 kept, > L slowed by s.
    wl = 2 * math.pi * 1e4 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    assert views["llama3"].pairs_kept == int((wl < 2048 / 4).sum())
    assert views["llama3"].pairs_interpolated == int((wl > 2048).sum())
    # ntk: the fastest pair keeps its speed, the slowest is slowed by exactly s.
    ntk = views["ntk"].wavelengths / wl
    assert ntk[0].item() == pytest.approx(1.0) and ntk[-1].item() == pytest.approx(8.0)


def test_longrope_is_skipped_without_factors_and_shown_with_them():
    configs, skipped = method_configs(_smollm2_like(), 16384)
    assert "longrope" not in configs and "per-pair factors" in skipped["longrope"]
    phi = RopeConfig(head_dim=96, base=1e4, method="longrope", original_max_position=4096, max_position=131072,
                     factor=32.0, short_factor=[1.0] * 48, long_factor=[1.0 + i for i in range(48)])
    report = inspect_rope(phi, 131072)
    names = [v.name for v in report.methods]
    assert names[0] == "as trained (longrope)" and "longrope" in names
    assert report.methods[0].attention_scale == pytest.approx(1.1902, abs=1e-4)  # Phi-3 mini 128k


def test_decay_curve_is_roformers_bound():
    theta = 1e4 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    distances = [0, 1, 7, 100, 5000]
    curve = decay_curve(theta, distances)
    for m, value in zip(distances, curve):
        partial, total = 0j, 0.0
        for t in theta.tolist():  # S_j = sum_{k<j} e^{i m theta_k}, averaged |S_j| over j = 1..d/2
            partial += cmath.exp(1j * m * t)
            total += abs(partial)
        assert value.item() == pytest.approx(total / 16, rel=1e-12)
    assert curve[0].item() == pytest.approx((16 + 1) / 2)
    # It decays: near tokens get a far larger bound than distant ones.
    near = decay_curve(theta, range(1, 10)).mean()
    far = decay_curve(theta, range(2000, 3000)).mean()
    assert near > 2 * far


def test_plots_are_written(tmp_path):
    report = inspect_rope(_smollm2_like(), 32768, name="tiny")
    for path in (plot_wavelengths(report, tmp_path / "a" / "w.png"), plot_decay(report, tmp_path / "d.png")):
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_bad_target_length():
    with pytest.raises(ValueError, match="target_length"):
        inspect_rope(_smollm2_like(), 0)
    with pytest.raises(ValueError, match="original_max_position"):
        inspect_rope(RopeConfig(head_dim=64))


# ---------------------------------------------------------------------- CLI
def _cli():
    import typer

    from ropekit.commands import export, inspect

    app = typer.Typer()
    inspect.register(app)
    export.register(app)
    return app


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "rope_theta": 500000.0,
                "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def test_cli_inspect_on_a_config_file_alone(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_CONFIG))  # Llama 3.2 1B's RoPE, no weights anywhere
    out, report = tmp_path / "plots", tmp_path / "r.json"
    result = CliRunner().invoke(_cli(), ["inspect", str(config), "--target-length", "262144", "--out", str(out),
                                         "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "base 500000" in result.output and "trained length 8192" in result.output
    assert "as trained (llama3)" in result.output and "factor 32" in result.output
    data = json.loads(report.read_text())
    assert data["trained_length"] == 8192 and data["target_length"] == 262144
    assert data["pairs"] == 32 and len(data["wavelengths"]) == 32
    assert {m["method"] for m in data["methods"]} >= {"default", "linear", "yarn", "llama3", "dynamic", "ntk"}
    assert (out / "wavelengths.png").read_bytes()[:8] == PNG and (out / "decay.png").read_bytes()[:8] == PNG


def test_cli_inspect_the_bundled_demo(tmp_path):
    result = CliRunner().invoke(_cli(), ["inspect", "--out", str(tmp_path)])  # MODEL omitted: the demo
    assert result.exit_code == 0, result.output
    assert "SmolLM2" in result.output and "base 100000" in result.output and "trained length 8192" in result.output
    assert "turned at least once in training (wavelength <= 8192): 20 pairs" in result.output
    assert "target length 16384 (factor 2)" in result.output


@pytest.mark.parametrize("setup,message", [
    ("missing", "model not found"),
    ("gpt2", "no rotary position embeddings"),
    ("badjson", "not valid JSON"),
    ("badlength", "--target-length"),
])
def test_cli_inspect_errors(tmp_path, setup, message):
    path = tmp_path / "config.json"
    args = [str(path)]
    if setup == "gpt2":
        path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_positions": 1024}))
    elif setup == "badjson":
        path.write_text("{not json")
    elif setup == "badlength":
        path.write_text(json.dumps(LLAMA_CONFIG))
        args += ["--target-length", "0"]
    result = CliRunner().invoke(_cli(), ["inspect", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
