"""The README names every CLI command that exists, so docs cannot drift from code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click

from gpumeter.cli import cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def command_paths(group: click.Group, prefix: str, ctx: click.Context) -> Iterator[str]:
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        path = f"{prefix} {name}"
        yield path
        if isinstance(cmd, click.Group):
            yield from command_paths(cmd, path, click.Context(cmd, parent=ctx))


def test_every_command_is_in_the_readme() -> None:
    ctx = click.Context(cli)
    paths = list(command_paths(cli, "gpumeter", ctx))
    assert "gpumeter agent run" in paths and "gpumeter pipeline run" in paths
    missing = [p for p in paths if p not in README]
    assert missing == []


def test_every_command_has_help_text() -> None:
    ctx = click.Context(cli)
    for path in command_paths(cli, "gpumeter", ctx):
        cmd: click.Command | None = cli
        for part in path.split()[1:]:
            assert isinstance(cmd, click.Group)
            cmd = cmd.get_command(ctx, part)
        assert cmd is not None and (cmd.help or "").strip(), f"{path} has no help"


def test_every_command_shows_an_example() -> None:
    """The README promises an example in every command's --help."""
    ctx = click.Context(cli)
    lacking = []
    for path in command_paths(cli, "gpumeter", ctx):
        cmd: click.Command | None = cli
        for part in path.split()[1:]:
            assert isinstance(cmd, click.Group)
            cmd = cmd.get_command(ctx, part)
        assert cmd is not None
        if not isinstance(cmd, click.Group) and "Example" not in (cmd.help or ""):
            lacking.append(path)
    assert lacking == []
