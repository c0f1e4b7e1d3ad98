"""CLI: doctor."""

from __future__ import annotations

import typer

from tlfeat.cli.common import app, user_errors


@app.command()
@user_errors
def doctor() -> None:
    """Show what tlfeat sees: Keras backend, devices, compute precision, decoding processes, weight caches, versions."""
    from tlfeat.apps.doctor import doctor as environment

    facts = environment()
    width = max(map(len, facts))
    for label, value in facts.items():
        typer.echo(f"{label + ':':<{width + 1}} {value}")
