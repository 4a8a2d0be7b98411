"""Evaluation of RoPE extension methods on real models: perplexity by position, passkey, needle, compare.

* ``data``: evaluation text (file, folder, JSON lines, the Python standard library) and token windows.
* ``perplexity``: chunked-loss perplexity per position bucket (``evaluate_perplexity``).
* ``passkey`` / ``needle``: retrieval accuracy over depth x length (``evaluate_passkey``, ``evaluate_needle``).
* ``compare``: the main job, every method ranked with a recommendation (``run_compare``).
* ``report``: JSON / CSV / PNG / Markdown writers (atomic).
"""

from ropekit.evaluation.data import Document, TokenWindow, load_documents, prefix_windows, token_windows
from ropekit.evaluation.perplexity import MethodRun, PerplexityResult, evaluate_perplexity, token_nll

__all__ = ["Document", "MethodRun", "PerplexityResult", "TokenWindow", "evaluate_perplexity", "load_documents",
           "prefix_windows", "token_nll", "token_windows"]
