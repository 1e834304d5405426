"""The rich consoles of the command line, whose output does not depend on the terminal it lands in.

rich wraps text and sizes tables to the terminal, and, when its output is not a terminal (a pipe, a file,
a CI log, a test's captured output), to ``$COLUMNS`` or 80 columns, or to the size of whatever terminal
the process's other streams happen to be attached to. A message naming a long path then broke in the
middle of the path or of a sentence, at a place that changed with the length of a temporary directory's
name. Here plain messages are never wrapped (``soft_wrap``: a terminal wraps them for display, and what
is copied or grepped is one line), and off a terminal the console is wide enough that no table cell is
wrapped either.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

UNWRAPPED_WIDTH = 1000
"""Columns of a console that is not a terminal: wider than any line moestream prints."""


class CommandConsole(Console):
    """A :class:`rich.console.Console` that wraps nothing when it is not writing to a terminal."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)
        super().__init__(**kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None:
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


__all__ = ["CommandConsole", "UNWRAPPED_WIDTH"]
