"""Shared fixtures: ``tiny_model`` (a factory over ``tiny.make_tiny_model``) and the real SmolLM2 (session-scoped).

Builders live in the ordinary module ``tests/tiny.py``; test files import them from there, never from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tiny import TINY_CONFIGS, TINY_TRAINED_LENGTH, TINY_VOCAB, make_tiny_config, make_tiny_model  # noqa: F401,E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Llama (trained length 64) saved with a byte tokenizer: a model folder the CLI loads."""
    from tiny import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model(family, rope=None, seed=0, **config)`` -> model."""
    return make_tiny_model


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF, float32, CPU) as a ``ropekit.hf.LoadedModel``.

    Loaded once per test session (~25 s). Tests must leave it unpatched (use ``with apply_rope(...)``).
    """
    from ropekit.hf import demo_model_path, load_model

    try:
        demo_model_path()
    except FileNotFoundError as exc:  # pragma: no cover - CI installs it
        pytest.fail(str(exc))
    return load_model("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def stdlib_text() -> str:
    """Real text available on every machine: Python standard-library sources, concatenated (~2 MB)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "typing.py", "inspect.py", "dataclasses.py", "subprocess.py", "pathlib.py",
             "tarfile.py", "zipfile.py", "logging/__init__.py", "collections/__init__.py"]
    parts = [(root / n).read_text(encoding="utf-8") for n in names if (root / n).is_file()]
    return "\n\n".join(parts)


def pytest_report_header(config):
    return f"python {sys.version.split()[0]}, torch {torch.__version__}"


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model's weights are loaded (bad input must be refused first)."""
    import ropekit.hf
    import ropekit.hf.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(ropekit.hf, "load_model", refuse)
    monkeypatch.setattr(ropekit.hf.load, "load_model", refuse)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A short plain-text file (60 lines) for commands that need --data."""
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text("".join(f"Line {i}: a stitch in time saves nine.\n" for i in range(60)), encoding="utf-8")
    return path
