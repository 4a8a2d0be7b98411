"""The `ropekit` command. Each sub-command lives in its own module under ``ropekit.commands``.

Exit codes: 0 success, 1 a run that failed, 2 a usage error (one line on stderr: ``error: --option: ...``).
"""

from __future__ import annotations

import importlib
import sys

import typer

# click's exception classes, wherever this typer keeps them (its own vendored copy or click itself).
_errors = sys.modules[typer.BadParameter.__module__]
UsageError = _errors.UsageError
ClickException = _errors.ClickException
NoArgsIsHelpError = getattr(_errors, "NoArgsIsHelpError", None)

app = typer.Typer(
    name="ropekit",
    help="RoPE and context-window extension: inspect, evaluate, compare, export, fine-tune, search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels print "<bool>" beside every flag, inviting "--quick true".
    rich_markup_mode=None,
)

# Modules under ropekit.commands; each defines register(app).
COMMAND_MODULES: list[str] = ["evaluate", "compare", "inspect", "export", "bench", "finetune", "study", "search"]

USAGE_ERROR = 2


def build_app() -> typer.Typer:
    if not app.registered_commands and not app.registered_groups:
        for name in COMMAND_MODULES:
            importlib.import_module(f"ropekit.commands.{name}").register(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; click's multi-line usage errors become one line (``error: ...``, exit 2)."""
    command = typer.main.get_command(build_app())
    try:
        code = command.main(args=argv, prog_name="ropekit", standalone_mode=False)
    except UsageError as exc:
        if NoArgsIsHelpError is not None and isinstance(exc, NoArgsIsHelpError):
            print(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        print(f"error: {' '.join(_usage_message(exc, list(argv or sys.argv[1:])).split())}", file=sys.stderr)
        code = USAGE_ERROR
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        code = 130
    except ClickException as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc, argv: list[str]) -> str:
    message = exc.format_message()
    if "unexpected extra argument" in message and exc.ctx is not None:
        words = {"true", "false", "yes", "no", "1", "0", "on", "off"}
        given = [a for a in argv if a.lower() in words]
        if given:
            message = (f"flags take no value: write the flag alone (e.g. --quick) or its --no- form, "
                       f"not '{given[0]}' after it; {message}")
    if exc.ctx is not None and exc.ctx.command_path:
        sub = exc.ctx.command_path.partition(" ")[2]
        if sub:
            message += f" (ropekit {sub} --help lists the options)"
    return message


if __name__ == "__main__":
    main()
