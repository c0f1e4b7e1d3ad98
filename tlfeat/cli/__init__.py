"""tlfeat's command line: `tlfeat`, `python -m tlfeat` and `python cli.py` run this app."""

from tlfeat.cli import analysis, doctor, export, extract, finetune, heads, recipe  # noqa: F401  (each registers its commands on `app`)
from tlfeat.cli.common import app


def main() -> None:
    """Entry point of the installed `tlfeat` command."""
    app()


__all__ = ["app", "main"]
