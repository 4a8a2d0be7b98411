"""The `ropekit` command. Each sub-command lives in its own module under ``ropekit.commands``.

Exit codes: 0 success, 1 a run that failed, 2 a usage error (one line on stderr: ``error: --option: ...``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer
import typer.core

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


# A MODEL argument that is one of these words (and no file or folder) is a flag's value typed by mistake.
BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


class CheckedCommand(typer.core.TyperCommand):
    """A sub-command whose options get the checks every command shares, after parsing and before the command
    runs (so before anything is read or loaded): a float option that is not finite (``--tolerance nan``,
    ``--lr inf``; the registry's ``check_number``, the rule method parameters follow too), and a MODEL that is
    a bare boolean word (``compare --overwrite true`` reads ``true`` as the model)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        ctx.meta["ropekit.args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from ropekit.commands.common import error_exit
        from ropekit.methods.registry import check_number

        for param in self.params:
            value = ctx.params.get(param.name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, float):
                    try:
                        check_number(_flag(param), item)
                    except ValueError as exc:
                        error_exit(str(exc))
        model = ctx.params.get("model")
        if isinstance(model, str) and model.lower() in BOOL_WORDS and not Path(model).exists():
            error_exit(f"MODEL: {model!r} is not a model (a folder, a .gguf file, a hub id or 'demo'); "
                       f"flags take no value ({self._flag_before(ctx, model)}, not "
                       f"{self._flag_before(ctx, model)} {model})")
        return super().invoke(ctx)

    def _flag_before(self, ctx, word: str) -> str:
        """The flag typed just before ``word`` (``--overwrite`` in ``--overwrite true``), else a flag of this
        command that takes no value."""
        args = ctx.meta.get("ropekit.args", [])
        for before, arg in zip(args, args[1:]):
            if arg == word and before.startswith("--"):
                return before.partition("=")[0]
        flags = [p for p in self.params if getattr(p, "is_flag", False) and getattr(p, "opts", None)]
        return _flag(flags[0]) if flags else "--overwrite"


def _flag(param) -> str:
    """The long form of an option (``--factor`` for ``-f/--factor``); an argument's name in capitals."""
    opts = list(getattr(param, "opts", None) or [])
    if getattr(param, "param_type_name", "") == "argument" or not opts:
        return (param.name or "").upper()
    return next((o for o in opts if o.startswith("--")), opts[0])


def _checked(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = CheckedCommand
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _checked(group.typer_instance)


def build_app() -> typer.Typer:
    if not app.registered_commands and not app.registered_groups:
        for name in COMMAND_MODULES:
            importlib.import_module(f"ropekit.commands.{name}").register(app)
        _checked(app)
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
