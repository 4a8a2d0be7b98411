"""Every causal-LM family of the installed transformers whose model has a rotary module (``rope_families()``,
found from transformers' own modeling code, not a list): a tiny model of each (``ropekit.hf.reference.
survey_family``) patched with its own RoPE gives its own logits, and patched with a scaled RoPE read from a
config with transformers' own ``rope_type`` gives that model's logits. A family ropekit cannot follow must be
refused with the reason, never patched wrong. ``scripts/family_table.py`` writes docs/families.md from the same
function."""

from __future__ import annotations

import pytest

from ropekit.hf.families import rope_families
from ropekit.hf.reference import family_table, survey_family

FAMILIES = rope_families()
# The families issue 13 found refused or silently wrong: each must now be patched and checked.
MUST_WORK = ("cohere", "deepseek_v3", "falcon_h1", "gemma3_text", "glm4", "gpt_oss", "granite", "olmo2", "smollm3",
             "gemma2", "qwen2", "llama", "phi3", "deepseek_v2", "glm", "cohere2")
_results: dict[str, object] = {}


def result(model_type: str):
    if model_type not in _results:
        _results[model_type] = survey_family(model_type)
    return _results[model_type]


def test_the_family_list_comes_from_transformers_and_holds_the_known_ones():
    assert len(FAMILIES) > 50
    assert set(MUST_WORK) - {"gemma3_text"} <= set(FAMILIES)
    assert "gpt2" not in FAMILIES and "opt" not in FAMILIES  # learned positions, no rotary module


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_is_patched_right_or_refused_with_a_reason(model_type):
    r = result(model_type)
    if r.status == "not built":
        pytest.skip(f"no tiny {model_type} model here: {r.detail}")
    assert r.status != "wrong", f"{model_type}: {r.detail}"
    if r.status == "refused":
        assert r.detail and "\n" not in r.detail
    else:
        assert r.status == "supported"


@pytest.mark.parametrize("model_type", MUST_WORK)
def test_the_families_issue_13_named_are_supported_with_a_scaled_check(model_type):
    r = result(model_type)
    assert r.status == "supported", f"{model_type}: {r.status}: {r.detail}"
    if model_type != "phi3":
        assert r.scaled.startswith("yarn x2 = transformers'"), r.scaled


def test_the_table_has_a_row_for_each_family_it_is_given():
    table = family_table([result(m) for m in FAMILIES[:3]])
    assert all(f"| {m}" in table for m in FAMILIES[:3])
