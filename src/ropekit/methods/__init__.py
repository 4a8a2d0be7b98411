"""Scaling methods, one module each, registered by name (see ``registry`` for what a method declares).

Adding a method: one new module here that calls ``register(MethodSpec(...))`` with its ``Param``s (imported
below without being named), plus its tests; a parameter that is no RopeConfig field is kept in
``RopeConfig.extra`` and read as ``cfg.<name>``.

``frequencies(cfg, seq_len)`` resolves a ``RopeConfig`` to float32/float64 inverse frequencies and the final
attention scale.
"""

from __future__ import annotations

import importlib
import pkgutil

from ropekit.methods import (  # noqa: F401  (registration order = listing order)
    default,
    linear,
    ntk,
    dynamic,
    yarn,
    dynamic_yarn,
    llama3,
    longrope,
    base_change,
)

# Any other module here is a method too, registered after the ones above (by file name): a new method is one
# new file. Modules starting with "_" are helpers.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_") and _module != "registry":
        importlib.import_module(f"{__name__}.{_module}")
from ropekit.methods.longrope import read_factors_file
from ropekit.methods.registry import (
    HF_FIXED_KEYS,
    METHOD_ALIASES,
    Frequencies,
    GGUFExport,
    MethodSpec,
    Param,
    baseline_label,
    canonical_name,
    get_method,
    hf_keys,
    hf_rope_keys,
    method_fields,
    method_names,
    parameters,
    readers,
    register,
    run_label,
    unregister,
)

__all__ = ["HF_FIXED_KEYS", "METHOD_ALIASES", "Frequencies", "GGUFExport", "MethodSpec", "Param", "baseline_label", "canonical_name",
           "frequencies", "get_method", "hf_keys", "hf_rope_keys", "method_fields", "method_names", "parameters",
           "read_factors_file", "readers", "register", "run_label", "unregister"]


def frequencies(cfg, seq_len: int | None = None) -> Frequencies:
    """Resolve ``cfg`` to its inverse frequencies and attention scale.

    Args:
        cfg: a ``RopeConfig``.
        seq_len: the current sequence length, used by length-dependent methods (dynamic, dynamic_yarn,
            longrope). None means the config's target length (``cfg.target_length``).
    Returns:
        ``Frequencies`` with ``.inv_freq`` (float32, rotary_dim/2), ``.inv_freq64`` and ``.attention_scale``.
    """
    spec = get_method(cfg.method)
    if seq_len is None:
        seq_len = cfg.target_length
    elif isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
    seq_len = None if seq_len is None else int(seq_len)
    out = spec.compute(cfg, seq_len)
    if isinstance(out, Frequencies):
        result = out
    else:
        inv, scale = out
        result = Frequencies(inv_freq64=inv, attention_scale=float(scale))
    return Frequencies(
        inv_freq64=result.inv_freq64,
        attention_scale=float(result.attention_scale),
        layout=cfg.layout,
        rotary_dim=cfg.rotary_dim,
        unscaled_until=result.unscaled_until,
        original_inv_freq64=result.original_inv_freq64,
        seq_len=seq_len if spec.length_dependent else None,
    )
