"""The CLI's shared parts: the typer app, one-line errors, option parsers.

Commands live in one module per topic (tlfeat/cli/<topic>.py), each registering on `app`.
They parse options, call the library and print; the library's defaults, choices
and help facts are read from its registries, never restated here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer 0.22+ parses with its own copy of click, older ones with click itself
    from typer._click import exceptions as click_exceptions
except ImportError:
    from click import exceptions as click_exceptions

from tlfeat.data.scan import DEFAULT_RATIOS
from tlfeat.errors import TlfeatError, cli_terms
from tlfeat.fileio import os_reason
from tlfeat.interrupts import interrupted_import

# TensorFlow's C++ info and warning logs are not for CLI users (its start-up banner, printed before this
# setting applies, is filtered by tlfeat.quiet_import).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _FlagsWithoutPlaceholder:
    """Typer 0.29 gives flags (--help included) a `<bool>` value placeholder, although `--quiet true` is
    refused: flags here show none."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class PlainHelpCommand(_FlagsWithoutPlaceholder, TyperCommand):
    """A command whose --help shows what its parser accepts, in every typer version tlfeat supports.

    Typer 0.27+ writes required arguments as `{data}` in usage lines: here they read `[OPTIONS] DATA`
    (`[NAME]` when optional, `NAME...` when repeated), as click writes them.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs == -1 else ""))
        return pieces


# `tlfeat --help` lists the commands in these panels, in this order: the way through tlfeat a new user takes.
COMMAND_PANELS: dict[str, tuple[str, ...]] = {
    "Start here": ("demo", "doctor", "backbones"),
    "Frozen features": ("extract", "fit-head", "recipe"),
    "Fine-tuning": ("finetune",),
    "Use and compare models": ("predict", "evaluate", "compare"),
    "Explore the embeddings": ("audit", "similar", "map", "export"),
}
_PANEL_OF = {name: title for title, names in COMMAND_PANELS.items() for name in names}
_RANK = {name: rank for rank, name in enumerate(_PANEL_OF)}


class PlainHelpGroup(_FlagsWithoutPlaceholder, TyperGroup):
    """The command list in COMMAND_PANELS' order, its --help without a placeholder; a usage error in one line.

    Typer prints a mistyped option or a missing argument as a usage line, a hint and a boxed message:
    here it is one line, like every other error, with the hint at its end.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(super().list_commands(ctx), key=lambda name: _RANK.get(name, len(_RANK)))

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # `tlfeat` alone: the help, as asked
            exc.show()
            sys.exit(0)
        except click_exceptions.UsageError as exc:
            message = " ".join(exc.format_message().split()).removesuffix(".")
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            typer.secho(f"error: {message}{hint}", err=True, fg=typer.colors.RED)
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            typer.secho(f"error: {' '.join(exc.format_message().split())}", err=True, fg=typer.colors.RED)
            sys.exit(exc.exit_code)
        except typer.Abort:  # end of input at a prompt
            typer.secho("error: aborted", err=True, fg=typer.colors.RED)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _App(typer.Typer):
    """The typer app, every command a PlainHelpCommand unless it names another class, in its COMMAND_PANELS panel."""

    def command(self, name: str | None = None, *, cls: type | None = None,  # type: ignore[override]
                **kwargs: Any) -> Callable:
        def register(function: Callable) -> Callable:
            panel = _PANEL_OF.get(name or function.__name__.replace("_", "-"))
            return super(_App, self).command(name, cls=cls or PlainHelpCommand, rich_help_panel=panel,
                                             **kwargs)(function)
        return register


app = _App(
    cls=PlainHelpGroup,
    help="Transfer learning with cached ImageNet CNN embeddings: extract once, fit heads in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Library parameters whose CLI option is not --<name-with-dashes>.
PARAMETER_OPTIONS = {"ratios": "--split", "data": "DATA", "caches": "CACHES", "inputs": "INPUTS"}


INTERRUPTED = "interrupted; the files already written are kept"


def user_errors(command: Callable) -> Callable:
    """Print a TlfeatError as one line on stderr (in the CLI's option names) and exit 1, with no traceback;
    likewise a Ctrl-C and a failed file operation that the command did not turn into a TlfeatError."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TlfeatError as exc:
            typer.secho(f"error: {cli_terms(str(exc), PARAMETER_OPTIONS)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except (ImportError, ValueError) as exc:  # Ctrl-C during TensorFlow's import, or a backend Keras lacks
            message = INTERRUPTED if interrupted_import(exc) else keras_backend_failure(exc)
            if message is None:
                raise
            typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            # commands with work to resume say more (an Interrupted's message)
            message = cli_terms(str(exc), PARAMETER_OPTIONS)
            typer.secho(f"error: {message or INTERRUPTED}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except BrokenPipeError:  # the reader of our output stopped early (`| head`): nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails no more
            raise typer.Exit(141) from None  # the shell's status for a process stopped by SIGPIPE
        except OSError as exc:  # a file that failed after the checks made before the work (a full disk, mostly)
            where = exc.filename2 or exc.filename  # a rename's target, or the file itself
            typer.secho(f"error: {where}: {os_reason(exc)}" if where else f"error: {os_reason(exc)}", err=True,
                        fg=typer.colors.RED)
            raise typer.Exit(1) from None

    return wrapper


def keras_backend_failure(exc: BaseException) -> str | None:
    """The one-line error for `import keras` failing on the backend it was told to load (`KERAS_BACKEND=torch`
    without torch installed, a misspelt name), else None. Keras raises it from deep in its own import (a
    ModuleNotFoundError for torch, a ValueError for an unknown name), which printed as a traceback."""
    if "keras" in sys.modules:  # a failed import leaves no `keras` module behind: this came from elsewhere
        return None
    spec = importlib.util.find_spec("keras")
    roots = tuple(os.path.join(root, "") for root in (spec.submodule_search_locations or [])) if spec else ()
    if not roots or not any(frame.filename.startswith(roots) for frame in traceback.extract_tb(exc.__traceback__)):
        return None
    chosen = os.environ.get("KERAS_BACKEND")
    backend = f"KERAS_BACKEND={chosen}" if chosen else "the backend in keras.json ($KERAS_HOME or ~/.keras)"
    return (f"Keras cannot load {backend}: {type(exc).__name__}: {' '.join(str(exc).split())}; install that "
            "backend or set KERAS_BACKEND to one that is installed (tensorflow, jax or torch)")


def program_name(ctx: typer.Context) -> str:
    """How the user started this CLI, to echo in hints: `tlfeat`, `python cli.py` or `python -m tlfeat`."""
    name = ctx.find_root().info_name or "tlfeat"
    return f"python {name}" if name.endswith(".py") else name


def format_ratios(ratios: tuple[float, ...]) -> str:
    """(0.5625, 0.1875, 0.25) -> "56.25,18.75,25": the --split spelling of split shares."""
    return ",".join(f"{100 * r:g}" for r in ratios)


DEFAULT_SPLIT = format_ratios(DEFAULT_RATIOS)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """--split "train,val,test" shares (any scale; "/" also separates)."""
    try:
        parts = tuple(float(p) for p in text.replace("/", ",").split(","))
    except ValueError:
        raise TlfeatError(f"--split {text!r}: expected three numbers like {DEFAULT_SPLIT}") from None
    if len(parts) != 3:
        raise TlfeatError(f"--split {text!r}: expected three numbers (train,val,test)")
    return parts  # type: ignore[return-value]
