"""What a model's RoPE is and what extending it does: wavelengths, attention scales, long-term decay.

Works on a ``RopeConfig`` alone (no weights). Wavelength of pair i: lambda_i = 2 pi / inv_freq_i tokens.
Pairs with lambda_i <= L (the trained length) turned at least once during training; the others never
saw a full turn, so positions beyond L give them angles the model never saw (the reason plain RoPE breaks
past L, and what every extension method changes).

Long-term decay (RoFormer, arXiv 2104.09864, section 3.4.3): for relative distance m,
|q . k| <= (max_i |h_{i+1} - h_i|) * sum_j |S_j| with S_j = sum_{k<j} e^{i m theta_k}; the curve is the
relative upper bound (1 / (d/2)) sum_{j=1}^{d/2} |S_j|, which falls with m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ropekit.config import RopeConfig
from ropekit.methods import frequencies, get_method, method_names
from ropekit.methods.base_change import suggested_base
from ropekit.methods.ntk import ntk_base

# Methods shown, in registry order (a snapshot at import; ``method_configs`` reads the registry each call).
# A method whose required parameters cannot be chosen from the target length (LongRoPE's searched per-pair
# factors) is shown only when the config already carries them.
INSPECT_METHODS = tuple(method_names())


@dataclass
class MethodView:
    """One method's RoPE at the target length.

    Attributes:
        name: method name.
        config: the RopeConfig used.
        wavelengths: (rotary_dim/2,) float64 wavelengths in tokens at the target length.
        attention_scale: the final factor on cos and sin (q.k scales by its square).
        pairs_kept: pairs whose frequency is unchanged from the model's.
        pairs_interpolated: pairs slowed by the full factor s (within 0.1%).
        pairs_beyond_target: pairs whose wavelength exceeds the target length (no full turn in it).
        note: a short explanation.
    """

    name: str
    config: RopeConfig
    wavelengths: torch.Tensor
    attention_scale: float
    pairs_kept: int
    pairs_interpolated: int
    pairs_beyond_target: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "config": self.config.to_dict(),
            "attention_scale": self.attention_scale,
            "pairs_kept": self.pairs_kept,
            "pairs_interpolated": self.pairs_interpolated,
            "pairs_beyond_target": self.pairs_beyond_target,
            "min_wavelength": float(self.wavelengths.min()),
            "max_wavelength": float(self.wavelengths.max()),
            "wavelengths": [float(w) for w in self.wavelengths],
            "note": self.note,
        }


@dataclass
class RopeReport:
    """``inspect_rope``'s result: the model's RoPE, per-method views at the target length, decay curves."""

    name: str
    config: RopeConfig
    trained_length: int
    target_length: int
    wavelengths: torch.Tensor  # (rotary_dim/2,) of the model's RoPE without scaling (what pre-training saw)
    methods: list[MethodView]
    decay_distances: torch.Tensor
    decay: dict[str, torch.Tensor]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def factor(self) -> float:
        return self.target_length / self.trained_length

    @property
    def pairs(self) -> int:
        return self.config.rotary_dim // 2

    @property
    def pairs_turned(self) -> int:
        """Pairs that completed at least one full turn within the trained length."""
        return int((self.wavelengths <= self.trained_length).sum())

    @property
    def pairs_never_turned(self) -> int:
        return self.pairs - self.pairs_turned

    def to_dict(self) -> dict[str, Any]:
        turns = self.trained_length / self.wavelengths
        return {
            "model": self.name,
            "rope": self.config.to_dict(),
            "trained_length": self.trained_length,
            "target_length": self.target_length,
            "factor": self.factor,
            "pairs": self.pairs,
            "pairs_turned_in_training": self.pairs_turned,
            "pairs_never_turned_in_training": self.pairs_never_turned,
            "wavelengths": [float(w) for w in self.wavelengths],
            "turns_in_training": [float(t) for t in turns],
            "methods": [m.to_dict() for m in self.methods],
            "skipped_methods": dict(self.skipped),
            "decay": {"distances": [int(d) for d in self.decay_distances],
                      **{name: [float(v) for v in curve] for name, curve in self.decay.items()}},
        }

    def table(self) -> str:
        """A readable summary (plain text, one table)."""
        c = self.config
        w = self.wavelengths
        lines = [
            f"RoPE of {self.name}: head_dim {c.head_dim}, rotary_dim {c.rotary_dim}, base {c.base:g}, "
            f"layout {c.layout}, method {c.method}",
            f"trained length {self.trained_length}; {self.pairs} pairs, wavelengths {w.min():.1f} .. {w.max():.4g} tokens",
            f"  turned at least once in training (wavelength <= {self.trained_length}): {self.pairs_turned} pairs"
            + (f" (i = 0..{self.pairs_turned - 1})" if self.pairs_turned else ""),
            f"  never completed a turn in training: {self.pairs_never_turned} pairs"
            + (f" (i = {self.pairs_turned}..{self.pairs - 1})" if self.pairs_never_turned else ""),
            "",
            f"target length {self.target_length} (factor {self.factor:g}):",
        ]
        width = max([13] + [len(m.name) + 1 for m in self.methods])
        header = (f"  {'method':<{width}}{'attn scale':>11}{'kept':>6}{'slowed by s':>13}{'> target':>10}"
                  f"{'max wavelength':>16}  note")
        lines.append(header)
        lines.append("  " + "-" * (len(header) - 2))
        for m in self.methods:
            lines.append(f"  {m.name:<{width}}{m.attention_scale:>11.4f}{m.pairs_kept:>6}{m.pairs_interpolated:>13}"
                         f"{m.pairs_beyond_target:>10}{float(m.wavelengths.max()):>16.4g}  {m.note}")
        for name, why in self.skipped.items():
            lines.append(f"  {name:<{width}}{'-':>11}{'-':>6}{'-':>13}{'-':>10}{'-':>16}  skipped: {why}")
        lines.append("")
        lines.append("kept: pairs at plain RoPE's speed; slowed by s: pairs interpolated by the full factor; "
                     "> target: pairs with no full turn within the target length")
        return "\n".join(lines)


def _suggest_new_base(cfg: RopeConfig, target_length: int, factor: float) -> float:
    """arXiv 2405.14591's bound for the target length; if the model's base is already above it, the NTK base."""
    new_base = suggested_base(target_length)
    if new_base <= cfg.base:
        new_base = ntk_base(cfg.base, factor, cfg.rotary_dim)
    return new_base


# Required parameters other than the factor and trained length that inspect can choose for a target length.
SUGGESTED_PARAMS = {"new_base": _suggest_new_base}


def method_configs(cfg: RopeConfig, target_length: int) -> tuple[dict[str, RopeConfig], dict[str, str]]:
    """Each applicable method at factor target / trained length: ({name: RopeConfig}, {skipped name: why})."""
    trained = cfg.require_trained_length()
    factor = target_length / trained
    out: dict[str, RopeConfig] = {"default": cfg.extend("default", original_max_position=trained,
                                                        target_length=trained)}
    skipped: dict[str, str] = {}
    for name in method_names():
        spec = get_method(name)
        if spec.unscaled:  # plain RoPE: the "default" baseline above
            continue
        chosen = [p for p in spec.params if p.field in spec.required
                  and p.field not in ("factor", "original_max_position")]
        missing = [p for p in chosen if p.field not in SUGGESTED_PARAMS]
        if missing:
            if cfg.method == name:  # the model's own (e.g. LongRoPE with its searched factors), at the target
                out[name] = cfg.replace(max_position=max(target_length, cfg.target_length or 0))
            elif all(p.type == "float_list" for p in missing):
                skipped[name] = f"needs searched per-pair factors ({'/'.join(p.field for p in missing)})"
            else:
                skipped[name] = f"needs {', '.join(p.field for p in missing)}"
        elif factor < 1.0 or (factor == 1.0 and "factor" in spec.required):
            skipped[name] = f"target length {target_length} is not beyond the trained length {trained}"
        else:
            params = {p.field: SUGGESTED_PARAMS[p.field](cfg, target_length, factor) for p in chosen}
            out[name] = cfg.extend(name, original_max_position=trained, target_length=target_length, **params)
    return out, skipped


def _method_note(name: str, cfg: RopeConfig) -> str:
    return get_method(name).description(cfg)


def method_view(name: str, cfg: RopeConfig, original: torch.Tensor, target_length: int) -> MethodView:
    freqs = frequencies(cfg, target_length if cfg.length_dependent else None)
    wl = freqs.wavelengths
    ratio = wl / original
    factor = cfg.factor or (target_length / cfg.require_trained_length())
    kept = int((torch.abs(ratio - 1) < 1e-9).sum())
    slowed = int((torch.abs(ratio / factor - 1) < 1e-3).sum()) if factor > 1.0 else 0
    return MethodView(name=name, config=cfg, wavelengths=wl, attention_scale=float(freqs.attention_scale),
                      pairs_kept=kept, pairs_interpolated=slowed,
                      pairs_beyond_target=int((wl > target_length).sum()), note=_method_note(name, cfg))


def decay_curve(inv_freq: torch.Tensor, distances: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """RoFormer's relative upper bound of |q.k| at each relative distance m: (1/(d/2)) sum_j |S_j|.

    Args:
        inv_freq: (d/2,) inverse frequencies theta_k.
        distances: (M,) relative distances m.
    Returns:
        (M,) float64 values (1 at m = 0 is not reached: |S_j| = j there, so the curve starts at (d/2 + 1)/2).
    """
    theta = torch.as_tensor(inv_freq, dtype=torch.float64)
    m = torch.as_tensor(distances, dtype=torch.float64)
    angles = m[:, None] * theta[None]
    partial = torch.cumsum(torch.polar(torch.ones_like(angles), angles), dim=-1)  # S_1 .. S_{d/2}
    return partial.abs().mean(dim=-1)


def decay_distances(max_distance: int, points: int = 256) -> torch.Tensor:
    """0 and log-spaced integer distances up to ``max_distance`` (unique, sorted)."""
    logs = torch.logspace(0, math.log10(max(2, max_distance)), points, dtype=torch.float64)
    return torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), torch.round(logs)])).to(torch.long)


def inspect_rope(cfg: RopeConfig, target_length: int | None = None, *, name: str = "model") -> RopeReport:
    """Analyse ``cfg`` (the model's RoPE as trained) and every applicable method at ``target_length``.

    ``target_length`` defaults to twice the trained length (a model that is already scaled: its own target).
    """
    if not isinstance(cfg, RopeConfig):
        raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
    trained = cfg.require_trained_length()
    if target_length is None:
        # An already-extended model (e.g. Llama 3.1, factor 8) is shown at its own target length.
        target_length = cfg.target_length if cfg.is_scaled and cfg.target_length else 2 * trained
    if isinstance(target_length, bool) or int(target_length) != target_length or target_length < 1:
        raise ValueError(f"target_length: must be a positive integer, got {target_length!r}")
    target_length = int(target_length)
    # The model as trained: a scaled model (e.g. Llama 3.1) is inspected with its own scaling.
    own = frequencies(cfg, trained if cfg.length_dependent else None)
    original_plain = frequencies(cfg.with_method("default"), None).wavelengths
    configs, skipped = method_configs(cfg, target_length)
    views = [method_view(n, c, original_plain, target_length) for n, c in configs.items()]
    if cfg.is_scaled:
        views.insert(0, MethodView(name=f"as trained ({cfg.method})", config=cfg, wavelengths=own.wavelengths,
                                   attention_scale=float(own.attention_scale),
                                   pairs_kept=int((torch.abs(own.wavelengths / original_plain - 1) < 1e-9).sum()),
                                   pairs_interpolated=0,
                                   pairs_beyond_target=int((own.wavelengths > target_length).sum()),
                                   note="the model's own scaling"))
    distances = decay_distances(2 * target_length)
    decay = {v.name: decay_curve(2 * math.pi / v.wavelengths, distances) for v in views}
    return RopeReport(name=name, config=cfg, trained_length=trained, target_length=target_length,
                      wavelengths=original_plain, methods=views, decay_distances=distances, decay=decay,
                      skipped=skipped)


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _mark_lengths(line, report: RopeReport) -> None:
    """The trained and target lengths as reference lines (``line``: ax.axhline or ax.axvline)."""
    line(report.trained_length, color="tab:red", linestyle="--", linewidth=1,
         label=f"trained length {report.trained_length}")
    line(report.target_length, color="tab:gray", linestyle=":", linewidth=1,
         label=f"target length {report.target_length}")


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_wavelengths(report: RopeReport, path: str | Path) -> Path:
    """Wavelength of each pair per method (log scale), trained and target lengths marked; writes a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    pairs = range(report.pairs)
    for view in report.methods:
        style = dict(linewidth=2.4, color="black") if view.name == "default" else dict(linewidth=1.3)
        ax.plot(pairs, view.wavelengths.numpy(), label=view.name, **style)
    _mark_lengths(ax.axhline, report)
    ax.set_yscale("log")
    ax.set_xlabel("pair index i")
    ax.set_ylabel("wavelength 2π/θ_i (tokens)")
    ax.set_title(f"{report.name}: RoPE wavelengths per method (factor {report.factor:g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, path)


def plot_decay(report: RopeReport, path: str | Path) -> Path:
    """RoFormer's long-term decay bound vs relative distance for each method; writes a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    d = report.decay_distances.numpy()
    for name, curve in report.decay.items():
        style = dict(linewidth=2.4, color="black") if name == "default" else dict(linewidth=1.1, alpha=0.9)
        ax.plot(d[1:], curve.numpy()[1:], label=name, **style)
    _mark_lengths(ax.axvline, report)
    ax.set_xscale("log")
    ax.set_xlabel("relative distance m (tokens)")
    ax.set_ylabel("relative upper bound of |q·k|")
    ax.set_title(f"{report.name}: long-term decay (RoFormer 3.4.3)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
