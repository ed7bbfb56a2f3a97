"""The one way moevl's commands report a user error: ``raise fail("...")`` prints ``error: ...`` on
stderr (one line, never wrapped, so paths stay whole and copyable) and exits with ``code``."""

from __future__ import annotations

import typer

__all__ = ["fail"]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Prints ``error: message`` (never wrapped, so paths stay whole) and returns the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)
