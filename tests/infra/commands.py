"""Check command lines written in deployment files against the real CLIs, without running them.

A command is parsed by the CLI's own parser (typer's for ``moestream``, click's for ``ray``): an unknown command,
an unknown option or a value of the wrong type raises, exactly as it would in the container.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any


def parse(cli: Any, name: str, args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``(full command name, parsed parameters)`` of ``args`` under ``cli`` (a click or typer command group)."""
    args = list(args)
    command = cli
    while hasattr(command, "commands"):
        if not args or args[0] not in command.commands:
            raise ValueError(f"`{name}` has no command {args[:1]}; it has {sorted(command.commands)}")
        name, command, args = f"{name} {args[0]}", command.commands[args[0]], args[1:]
    return name, dict(command.make_context(name, args).params)


def moestream_cli() -> Any:
    import typer.main

    from infra.cli import app

    return typer.main.get_command(app)


def ray_cli() -> Any:
    from ray.scripts.scripts import cli

    return cli


def parse_moestream(args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    if not args or args[0] != "moestream":
        raise ValueError(f"not a moestream command: {list(args)}")
    return parse(moestream_cli(), "moestream", args[1:])


def parse_ray(args: Sequence[str]) -> tuple[str, dict[str, Any]]:
    if not args or args[0] != "ray":
        raise ValueError(f"not a ray command: {list(args)}")
    return parse(ray_cli(), "ray", args[1:])


def parse_any(args: Sequence[str] | str) -> list[tuple[str, dict[str, Any]]]:
    """Every command a container would run for ``args``: a ``ray job submit`` is followed by its entrypoint
    (which must be a moestream command); a shell string is split the way a shell would."""
    args = shlex.split(args) if isinstance(args, str) else list(args)
    if args[:1] == ["moestream"]:
        return [parse_moestream(args)]
    name, params = parse_ray(args)
    parsed = [(name, params)]
    if name == "ray job submit":
        parsed += parse_any(list(params["entrypoint"]))
    return parsed
