"""``ropekit compare``: every applicable extension method on one model, measured, ranked, explained.

For a target length N and the model's trained length L (factor s = N / L), each method is applied with
``ropekit.hf.apply_rope`` and measured in **one forward pass per context**: a haystack of real text with many
labelled needles at spread depths (``evaluation.haystack``) is prefilled once; the same pass gives the
perplexity of the real text (needle tokens left out), and every needle's question is then answered greedily from
the cached context (``evaluation.cached``). Work is shared where the maths makes it exact:

* the perplexity of the first L tokens (the short-context check) is read off the same pass for methods whose
  rotation does not depend on the length (causal attention: a prefix's tokens see only the prefix);
  length-dependent methods get a separate L-token pass unless their rotation at L is the baseline's;
* two methods whose frequencies and attention scale are identical at N tokens (dynamic YaRN at exactly
  N tokens *is* YaRN at factor s) are measured once; the report says so.

Length-dependent methods are measured with their scale fixed at N for the whole sequence (``fix_length``), as
they run when a prompt of N tokens is generated from.

Statistics (``evaluation.stats``): perplexity with a bucket-bootstrap interval; accuracy with a Wilson interval
and its n; two methods are told apart only where a paired bootstrap (perplexity) or non-overlapping Wilson
intervals (retrieval) separate them; otherwise the report says they are tied at this sample size and about how
much more data would separate them.

The package, one concern a module: ``plan`` (options, which methods run, by the registry's hooks), ``measure``
(one forward pass per context), ``rank`` (ties and the recommendation), ``command_line`` (the ``ropekit export``
line it recommends), ``report`` (the report folder), ``run`` (``run_compare``, all of it).
"""

from ropekit.evaluation.compare.command_line import export_command
from ropekit.evaluation.compare.measure import MethodOutcome, build_haystacks, measure_method
from ropekit.evaluation.compare.plan import (
    DEFAULT_NEEDLES,
    CompareOptions,
    MethodPlan,
    longrope_factors,
    plan_methods,
    rotation_key,
)
from ropekit.evaluation.compare.rank import HEALTHY_RATIO, SHORT_REGRESSION, Recommendation, rank_outcomes, recommend
from ropekit.evaluation.compare.report import CompareReport, model_display_name, summary_markdown, write_compare_report
from ropekit.evaluation.compare.run import run_compare

__all__ = ["CompareOptions", "CompareReport", "DEFAULT_NEEDLES", "HEALTHY_RATIO", "MethodOutcome", "MethodPlan",
           "Recommendation", "SHORT_REGRESSION", "build_haystacks", "export_command", "longrope_factors",
           "measure_method", "model_display_name", "plan_methods", "rank_outcomes", "recommend", "rotation_key",
           "run_compare", "summary_markdown", "write_compare_report"]
