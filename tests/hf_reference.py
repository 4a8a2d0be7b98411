"""Test-side references: the published configs of tests/data/hf_configs.json, and (re-exported from
``ropekit.hf.reference``) transformers' own RoPE and the mpmath-exact one."""

from __future__ import annotations

import json
from pathlib import Path

from ropekit.hf.reference import (  # noqa: F401 - re-exported for the tests
    deinterleave,
    exact_inv_freq,
    exact_llama3,
    exact_rotate,
    exact_yarn,
    hf_config,
    hf_inv_freq_and_scale,
    hf_rotary_module,
    hf_rotate,
)

DATA = Path(__file__).parent / "data" / "hf_configs.json"


def load_models() -> dict[str, dict]:
    """{name: {"source", "form", "synthetic", "config"}} from tests/data/hf_configs.json."""
    return json.loads(DATA.read_text())["models"]
