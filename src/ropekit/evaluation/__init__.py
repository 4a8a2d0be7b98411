"""Evaluation of RoPE extension methods on real models: perplexity by position, retrieval, RULER, compare.

* ``data``: evaluation text (file, folder, JSON lines, the Python standard library) and token windows.
* ``perplexity``: chunked-loss perplexity per position bucket (``evaluate_perplexity``).
* ``haystack`` / ``cached``: many labelled needles in one real-text context, prefilled once, every question
  answered from the KV cache (``build_haystack``, ``prefill``, ``answer``).
* ``stats``: Wilson and bootstrap intervals, paired comparisons, ties.
* ``scoring``: the retrieval scorer (is an answer right; when its decoding may stop), used by compare, passkey
  and ``cached``.
* ``passkey`` / ``needle``: retrieval accuracy over depth x length (``evaluate_passkey``, ``evaluate_needle``).
* ``ruler``: RULER-style tasks with intervals (``evaluate_ruler``).
* ``compare``: the main job, every method ranked with a recommendation (``run_compare``); a package (plan,
  measure, rank, command_line, report, run).
* ``report``: JSON / CSV / PNG / Markdown writers (atomic).
"""

from ropekit.evaluation.cached import Prefill, answer, prefill
from ropekit.evaluation.data import Document, TokenWindow, load_documents, prefix_windows, token_windows
from ropekit.evaluation.haystack import Haystack, Needle, build_haystack, haystack_text, with_answers
from ropekit.evaluation.perplexity import MethodRun, PerplexityResult, evaluate_perplexity, token_nll
from ropekit.evaluation.stats import paired_log_ratio, perplexity_interval, wilson_interval

__all__ = ["Document", "Haystack", "MethodRun", "Needle", "PerplexityResult", "Prefill", "TokenWindow", "answer",
           "build_haystack", "evaluate_perplexity", "haystack_text", "load_documents", "paired_log_ratio",
           "perplexity_interval", "prefill", "prefix_windows", "token_nll", "token_windows", "wilson_interval",
           "with_answers"]
