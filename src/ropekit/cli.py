"""The `ropekit` command. Each sub-command lives in its own module under ``ropekit.commands``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="ropekit",
    help="RoPE and context-window extension: inspect, evaluate, compare, export, fine-tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules under ropekit.commands; each defines register(app).
COMMAND_MODULES: list[str] = ["evaluate", "compare", "inspect", "export", "bench", "finetune", "study"]


def build_app() -> typer.Typer:
    for name in COMMAND_MODULES:
        importlib.import_module(f"ropekit.commands.{name}").register(app)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
