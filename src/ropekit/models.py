"""Kept for existing imports: the transformers integration lives in ``ropekit.hf`` (families, load, patch,
export); this module re-exports its public names. New code imports from ``ropekit.hf``."""

from ropekit.hf import *  # noqa: F401,F403
from ropekit.hf import __all__  # noqa: F401
