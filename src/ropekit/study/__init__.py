"""`ropekit study` (``ropekit.study``): train short, extend, fine-tune long — the evidence, end to end, on a CPU.

1. Pretrain a small Llama-style ``transformers`` model (built from a config, random init) at a short length
   L on real text: the Python standard library's sources, as UTF-8 bytes. Byte tokens (vocab 257) keep the
   embedding and softmax from dominating a CPU run, need no tokenizer training and are lossless; the
   price is fewer characters per context than a subword tokenizer gives.
   A share of the pretraining rows are synthetic passkey prompts (the standard filler, "The pass key is
   K. Remember it. K is the pass key.", then "What is the pass key? The pass key is K") so the small model
   learns retrieval at length L; the evaluation asks for keys in longer prompts.
2. Evaluate every method (no scaling, linear/PI, NTK, dynamic NTK, YaRN; scale s = factor) at L, 2L, 4L and
   8L: perplexity per length and per position bucket on held-out files, passkey accuracy.
3. Fine-tune a copy of the pretrained model with each method for the same number of steps at the long
   length (factor * L), on the same mixture, and evaluate again.
4. PoSE (``pose_window`` > 0): fine-tune YaRN (or the last method given) once more for the same steps, now on
   ``pose_window``-byte windows whose position ids are spread over factor * L (``ropekit.training.pose``), and
   set it beside the full-length run: training time, activation memory kept for backward, and the evaluation.
5. Write the report folder: summary.md, results.json, ppl_vs_position.png, training_curves.png.

The package: ``settings`` (sizes, methods), ``data`` (sources, passkey rows, mixtures), ``model`` (the model, the
methods' configs, the LongRoPE search), ``evaluate``, ``runs`` (``run_study``) and ``report``.
"""

from ropekit.study.data import (
    held_out_windows,
    mixed_rows,
    passkey_ids,
    passkey_rows,
    pose_mixture,
    stdlib_files,
)
from ropekit.study.evaluate import evaluate_methods, keys_correct, passkey_accuracy
from ropekit.study.model import build_model, method_config, search_longrope
from ropekit.study.report import (
    load_results,
    loss_spans,
    observations,
    plot_curves,
    plot_position,
    pose_section,
    search_section,
    span_means,
    summary_markdown,
)
from ropekit.study.runs import activation_bytes, pose_comparison, run_study
from ropekit.study.settings import (
    ANSWER_LEN,
    BYTES,
    KEY_DIGITS,
    METHOD_LABELS,
    MIN_PROMPT,
    QUICK,
    STUDY_METHODS,
    StudySizes,
)

__all__ = [
    "ANSWER_LEN", "BYTES", "KEY_DIGITS", "METHOD_LABELS", "MIN_PROMPT", "QUICK", "STUDY_METHODS", "StudySizes",
    "activation_bytes", "build_model", "evaluate_methods", "held_out_windows", "keys_correct", "load_results",
    "loss_spans", "method_config", "mixed_rows", "observations", "passkey_accuracy", "passkey_ids", "passkey_rows",
    "plot_curves", "plot_position", "pose_comparison", "pose_mixture", "pose_section", "run_study",
    "search_longrope", "search_section", "span_means", "stdlib_files", "summary_markdown",
]
