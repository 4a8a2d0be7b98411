"""ropekit inside transformers models: families, loading, the RoPE patch, export.

* ``families``: any transformers model with a rotary module (``rope_families()`` lists the installed ones;
  ``SUPPORTED_FAMILIES`` names the documented ones), found from its structure (``locate``, ``probe_tables``,
  ``probe_functions``), ``model_layered_rope`` (per-layer RoPE), ``TransformersStructureError``.
* ``load``: ``load_model`` (hub id, folder, ``.gguf``, ``"demo"``) -> ``LoadedModel``; device and dtype choice.
* ``checks``: ``check_model_source`` (the file-system checks ``load_model`` runs first), ``demo_model_path``.
* ``patch``: ``apply_rope(model, cfg, backend=...)`` -> ``RopePatch``; no process-wide state decides which
  model rotates how (see the module docstring).
* ``routing``: how a patched model's rotation reaches ropekit (``RotaryCall``, ``RopekitRotaryAdapter``, the
  router around ``apply_rotary_pos_emb``); re-exported by ``patch``.
* ``export``: ``hf_config_for`` and ``export_model`` (a checkpoint plain transformers loads).
* ``reference`` (not imported here): transformers' own RoPE driven from a config dict, and an mpmath-exact
  RoPE, for parity checks (the tests, ``scripts/parity_report.py``).
"""

from ropekit.hf.checks import DEMO_MODEL, DEMO_PACKAGE, check_model_source, demo_model_path
from ropekit.hf.export import export_model, hf_config_for
from ropekit.hf.families import (
    FAMILIES,
    NO_ROPE_FAMILIES,
    SUPPORTED_FAMILIES,
    TRANSFORMERS_TESTED,
    Family,
    TransformersStructureError,
    check_family,
    check_rope_matches,
    has_rope,
    iter_supported_families,
    model_layered_rope,
    model_rope_config,
    rope_families,
    transformers_version,
    unsupported_family_message,
)
from ropekit.hf.load import (
    DEVICES,
    DTYPES,
    LoadedModel,
    ModelLoadError,
    load_model,
    read_model_config,
    resolve_device,
    resolve_dtype,
)
from ropekit.hf.patch import (
    BACKENDS,
    RopekitRotaryAdapter,
    RopePatch,
    RotaryCall,
    active_patch,
    apply_rope,
)

__all__ = [
    "BACKENDS",
    "DEMO_MODEL",
    "DEMO_PACKAGE",
    "DEVICES",
    "DTYPES",
    "FAMILIES",
    "NO_ROPE_FAMILIES",
    "SUPPORTED_FAMILIES",
    "TRANSFORMERS_TESTED",
    "Family",
    "LoadedModel",
    "ModelLoadError",
    "RopePatch",
    "RopekitRotaryAdapter",
    "RotaryCall",
    "TransformersStructureError",
    "active_patch",
    "apply_rope",
    "check_family",
    "check_model_source",
    "check_rope_matches",
    "has_rope",
    "demo_model_path",
    "export_model",
    "hf_config_for",
    "iter_supported_families",
    "load_model",
    "model_layered_rope",
    "model_rope_config",
    "read_model_config",
    "resolve_device",
    "resolve_dtype",
    "rope_families",
    "transformers_version",
    "unsupported_family_message",
]
