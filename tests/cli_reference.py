"""Generate docs/cli.md: every gpumeter command with its --help text, exactly as click renders it.

Run ``python tests/cli_reference.py`` (``make docs``) after changing a command. The unit test
``tests/unit/test_docs_reference.py`` fails while docs/cli.md differs from what this writes.
The help is rendered at a fixed width, so the file does not depend on the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
WIDTH = 100

HEADER = """# Command reference

Every `gpumeter` command and its `--help` text. This file is generated from the code by
`make docs`; do not edit it by hand. The rules the billing commands follow are in
[billing-rules.md](billing-rules.md) and the files they read and write in
[file-formats.md](file-formats.md).
"""


def commands(command: click.Command, ctx: click.Context) -> Iterator[tuple[click.Command, click.Context]]:
    """The command and, depth first in click's listing order, every subcommand, each with a context
    whose command path is its full name (``gpumeter billing settle``)."""
    yield command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None:
                raise LookupError(f"{ctx.command_path} lists {name!r} but has no such command")
            yield from commands(sub, click.Context(sub, info_name=name, parent=ctx))


def render() -> str:
    """The text of docs/cli.md for the commands as they are now."""
    from gpumeter.cli import cli

    root = click.Context(cli, info_name="gpumeter", terminal_width=WIDTH, max_content_width=WIDTH)
    parts = [HEADER]
    for command, ctx in commands(cli, root):
        if "(Not installed: needs the" in (command.help or ""):
            raise RuntimeError(f"{ctx.command_path}: its extra is not installed; install every extra first")
        parts.append(f"\n## {ctx.command_path}\n\n```text\n{command.get_help(ctx).rstrip()}\n```\n")
    return "".join(parts)


def main() -> int:
    CLI_MD.parent.mkdir(parents=True, exist_ok=True)
    CLI_MD.write_text(render(), encoding="utf-8")
    print(f"wrote {CLI_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
