"""`ropekit search MODEL --target-length N`: evolutionary search of LongRoPE factors (``ropekit.search``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    MODEL_HELP,
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    OverwriteOpt,
    check_data_or_exit,
    check_device_or_exit,
    check_out_or_exit,
    check_positive,
    cli_message,
    error_exit,
    fail_on,
    flags_for,
    load_model_or_exit,
    model_rope_or_exit,
)

HELP = ("Search LongRoPE per-pair factors that extend MODEL to --target-length without fine-tuning: an evolutionary "
        "search seeded with PI, NTK and YaRN (LongRoPE2's parameterisation: only pairs from the critical dimension "
        "on are searched), scored by needle-driven perplexity (answer tokens of many needles in one long context, "
        "plus the text's own perplexity) with a guard on short-range perplexity. The attention factor (cos/sin "
        "scale) is fixed (YaRN's, or --attention-factor), or searched as one more gene with --search-attention, "
        "guarded by the perplexity of the first trained-length tokens run alone (transformers' longrope applies "
        "the attention factor to short sequences too). Writes factors.json (for "
        "--factors-file and transformers' longrope), the search log, progress.png and factors.png to --out; "
        "checkpoints after every candidate (--resume continues exactly). MODEL: " + MODEL_HELP)


def register(app: typer.Typer) -> None:
    @app.command("search", help=HELP)
    def search_command(
        model: ModelArg = None,
        target_length: Annotated[int, typer.Option("--target-length", "-n", help="the context length to reach, "
                                                   "in tokens (> the trained length)")] = ...,
        out: Annotated[Path, typer.Option("--out", "-o", help="output folder (new, empty, or this search's own "
                                          "with --resume)")] = ...,
        data: Annotated[Optional[str], typer.Option("--data", "-d", help="text of the fitness haystack: a text "
                                                    "file, a folder, a .jsonl file, or 'stdlib' (default)")] = None,
        budget: Annotated[Optional[int], typer.Option("--budget", help="forward passes at most: the guard's "
                                                      "reference and the candidates' (not counted: the trained-length "
                                                      "forwards of --search-attention's guard, one per attention "
                                                      "value, and the one that reports a fixed attention factor's "
                                                      "short-context cost at the end; default: no limit)")] = None,
        population: Annotated[int, typer.Option("--population", help="population size (generation 0 evaluates "
                                                "it all, later ones half of it)")] = 8,
        generations: Annotated[int, typer.Option("--generations", help="generations at most")] = 5,
        patience: Annotated[int, typer.Option("--patience", help="stop after this many generations without a "
                                              "better best score")] = 3,
        needles: Annotated[int, typer.Option("--needles", help="needles (questions) in the haystack")] = 32,
        genes: Annotated[str, typer.Option("--genes", help="critical (LongRoPE2: pairs from the critical "
                                           "dimension on) or all (LongRoPE: every pair)")] = "critical",
        refill: Annotated[str, typer.Option("--refill", help="pairs below the critical dimension: ntk (LongRoPE2: "
                                            "NTK curve through the first gene) or yarn (YaRN's factors)")] = "ntk",
        max_factor: Annotated[Optional[float], typer.Option("--max-factor", help="largest factor a gene may take "
                                                            "(default 2 x the scale)")] = None,
        mutation_step: Annotated[float, typer.Option("--mutation-step", help="size of a mutation: the sigma of "
                                                     "the log-normal step of a moved gene (0.15 = about 15%)")] = 0.15,
        attention_factor: Annotated[Optional[float], typer.Option(
            "--attention-factor", help="attention factor (cos/sin scale) of every candidate (default YaRN's "
                                       "0.1 ln s + 1, so that the YaRN seed is YaRN exactly; not with "
                                       "--search-attention)")] = None,
        search_attention: Annotated[bool, typer.Option(
            "--search-attention", help="search the attention factor too, as one more gene in [1, 1 + 0.2 ln s] "
                                       "(each seed starts from its method's own); a guard adds a penalty when the "
                                       "perplexity of the first trained-length tokens, run alone with the "
                                       "candidate's attention factor, exceeds the unscaled model's by more than "
                                       "--short-tolerance (one extra forward of that length per attention value)")
        ] = False,
        short_tolerance: Annotated[float, typer.Option(
            "--short-tolerance", help="with --search-attention: the fraction by which short-context perplexity "
                                      "may grow before the guard penalises it")] = 0.01,
        tolerance: Annotated[float, typer.Option("--tolerance", help="short-range perplexity may grow by this "
                                                 "fraction before the guard penalises it")] = 0.05,
        text_weight: Annotated[float, typer.Option("--text-weight", help="weight of the text NLL beside the "
                                                   "answer NLL in the score (0: answers only)")] = 1.0,
        seed: Annotated[int, typer.Option("--seed", help="random seed (search and haystack)")] = 0,
        resume: Annotated[bool, typer.Option("--resume", help="continue the search checkpointed in --out")] = False,
        export: Annotated[Optional[Path], typer.Option("--export", help="also write a transformers checkpoint "
                                                       "(rope_type longrope) of the result to this folder")] = None,
        overwrite: OverwriteOpt = False,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = None,
        chunk_size: Annotated[int, typer.Option("--chunk-size", help="positions per output-head chunk")] = 1024,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    ) -> None:
        from ropekit.search.genome import GENE_MODES, REFILLS

        # Every check that needs no weights, first.
        check_positive(population=(population, 2), generations=(generations, 1), patience=(patience, 1),
                       needles=(needles, 1), chunk_size=(chunk_size, 1))
        if budget is not None and budget < 2:
            error_exit(f"--budget: must be >= 2 forwards (the guard's reference and one candidate), got {budget}")
        if genes not in GENE_MODES:
            error_exit(f"--genes: {genes!r} not accepted; accepted: {', '.join(GENE_MODES)}")
        if refill not in REFILLS:
            error_exit(f"--refill: {refill!r} not accepted; accepted: {', '.join(REFILLS)}")
        if not 0 < mutation_step <= 2:
            error_exit(f"--mutation-step: must be in (0, 2], got {mutation_step}")
        if tolerance < 0:
            error_exit(f"--tolerance: must be >= 0, got {tolerance}")
        if text_weight < 0:
            error_exit(f"--text-weight: must be >= 0, got {text_weight}")
        if attention_factor is not None and not attention_factor > 0:
            error_exit(f"--attention-factor: must be > 0, got {attention_factor}")
        if search_attention and attention_factor is not None:
            error_exit("--search-attention: searches the attention factor; do not fix it with --attention-factor "
                       "as well")
        if short_tolerance < 0:
            error_exit(f"--short-tolerance: must be >= 0, got {short_tolerance}")
        from ropekit.output import OutputError
        from ropekit.search.run import check_search_folder

        try:
            check_search_folder(out, resume=resume, overwrite=overwrite)
        except OutputError as exc:
            error_exit(str(exc))
        if export is not None:
            check_out_or_exit(export, overwrite, option="--export")
        check_data_or_exit(data)
        check_device_or_exit(device, dtype)
        base_cfg, name = model_rope_or_exit(model)
        trained = base_cfg.trained_length
        if not trained:
            error_exit("MODEL: its config does not say the length it was trained at (original_max_position)")
        if target_length <= trained:
            error_exit(f"--target-length: must be > the trained length {trained}, got {target_length}")
        s = target_length / trained
        if max_factor is not None and max_factor < (s if genes == "critical" else 1.0):
            error_exit(f"--max-factor: must be >= {s if genes == 'critical' else 1.0:g} (the lowest gene value), "
                       f"got {max_factor}")
        if export is not None:
            from ropekit.hf import hf_config_for  # noqa: F401  (exportable families are checked at export)
        check_search_size_or_exit(model, target_length, data, trained=trained, needles=needles, device=device,
                                  dtype=dtype)

        typer.echo(f"loading {name} ...")
        loaded = load_model_or_exit(model, device=device, dtype=dtype)
        from ropekit.evaluation.data import load_documents
        from ropekit.search.run import SearchOptions, search_factors

        options = SearchOptions(target_length=target_length, budget=budget, population=population,
                                generations=generations, patience=patience, seed=seed, needles=needles, genes=genes,
                                refill=refill, max_factor=max_factor, mutation_step=mutation_step,
                                attention_factor=attention_factor, search_attention=search_attention,
                                short_tolerance=short_tolerance,
                                tolerance=tolerance, text_weight=text_weight, chunk_size=chunk_size)
        command = "ropekit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        try:
            result = search_factors(loaded, options, out, documents=load_documents(data), data_name=data or "stdlib",
                                    model_name=model or "demo", resume=resume, overwrite=overwrite,
                                    progress=not quiet, command=command)
        except ValueError as exc:
            message = str(exc)
            if message.startswith("data:"):
                fail_on("--data", message)
            error_exit(cli_message(message, {**flags_for("target_length", "search_attention", "tolerance",
                                                         "short_tolerance", "text_weight", "budget", "max_factor",
                                                         "mutation_step", "needles", "resume"),
                                             "attention_factor": "--attention-factor"}))
        rec = result.factors["search"]
        yarn = rec["seeds"].get("yarn", {}).get("score")
        typer.echo(f"best #{result.best.id} ({result.best.origin}, generation {result.best.generation}): score "
                   f"{result.best.score:.4f}" + (f", YaRN {yarn:.4f}" if yarn is not None else "")
                   + f"; {result.forwards} forwards (+{rec['short_forwards']} short-context forwards of {trained} "
                   f"tokens), stopped: {result.stopped}")
        att = rec["attention"]
        ratio = att.get("short_ratio")
        typer.echo(f"attention factor {att['attention_factor']:.4f} "
                   + (f"(searched in [{att['low']:.4f}, {att['high']:.4f}])" if att["searched"] else "(fixed)")
                   + (f"; short-context perplexity x{ratio:.4f} of the unscaled model's at {trained} tokens"
                      if ratio is not None else "; short context not measured (no text below the trained length)"))
        typer.echo(f"wrote {Path(out) / 'factors.json'} (use: --method longrope --factors-file "
                   f"{Path(out) / 'factors.json'})")
        if export is not None:
            from ropekit.hf import export_model
            from ropekit.search.run import factors_config

            try:
                path = export_model(loaded, factors_config(loaded, result.factors), export, overwrite=overwrite)
            except (FileExistsError, ValueError) as exc:
                error_exit(f"--export: {exc}")
            typer.echo(f"wrote {path}: rope_type longrope (plain transformers loads it)")


def check_search_size_or_exit(model: str | None, target_length: int, data: str | None, *, trained: int, needles: int,
                              device: str, dtype: str | None) -> None:
    """Before the load: ``target_length`` leaves more than the trained length of context after the questions,
    the text holds that context (the fitness haystack) and the machine can hold a forward of ``target_length``
    tokens; one line naming the option otherwise. The tokenizer loads only where the sizes do not settle it."""
    from ropekit.commands.limits import check_memory_or_exit, check_text_or_exit, lazy_tokenizer, qa_tokens_bound
    from ropekit.evaluation.haystack import qa_tokens
    from ropekit.search.fitness import SEARCH_STYLE

    tokenizer = lazy_tokenizer(model)
    room = qa_tokens_bound(needles, SEARCH_STYLE)
    if target_length - room <= trained and tokenizer() is not None:
        context = target_length - qa_tokens(tokenizer(), needles, SEARCH_STYLE)
        if context <= trained:
            error_exit(f"--target-length: {target_length} leaves {context} tokens of context after {needles} "
                       f"questions, not more than the trained length {trained}; use fewer --needles or a longer "
                       f"target")
    check_text_or_exit(model, data, max(target_length - room, trained + 1), joined=True, tokenizer=tokenizer,
                       length_option="--target-length",
                       exact_length=lambda tok: target_length - qa_tokens(tok, needles, SEARCH_STYLE))
    check_memory_or_exit(model, target_length, "--target-length", device=device, dtype=dtype)
