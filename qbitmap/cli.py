"""Command line: a click group with ``dump``, ``check`` and ``recover``.

Thin by design: each command lives in ``qbitmap/commands/`` and only opens
the image, calls the library, hands results to a renderer and picks the exit
code.  This module maps errors onto exit codes in one place: usage errors
exit 64 (click's 2 is ``check``'s "corrupt"), a QbitmapError is one line on
stderr with its own code, and anything unexpected is one line too unless
``--debug`` (or QBITMAP_DEBUG=1) asks for the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from qbitmap import __version__
from qbitmap.errors import ExitCode, QbitmapError
from qbitmap.ui import Ui

# numpy's OpenBLAS starts a thread pool when numpy is imported, which costs
# tens of milliseconds per run (measured on bench_dump); qbitmap does no linear algebra.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class QbitmapGroup(click.Group):
    """Maps usage errors and QbitmapError onto qbitmap's exit codes."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: bare `qbitmap`
                sys.stderr.write(exc.format_message() + "\n")
                sys.exit(ExitCode.USAGE)
            # One line, like every other error (click's own form takes four).
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            sys.stderr.write(f"qbitmap: error: {_one_line(exc.format_message())}{hint}\n")
            sys.exit(ExitCode.USAGE)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # pragma: no cover - interactive
            sys.stderr.write("qbitmap: aborted\n")
            sys.exit(ExitCode.FAILED)
        except KeyboardInterrupt:  # pragma: no cover - interactive
            sys.stderr.write("qbitmap: interrupted\n")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else ExitCode.OK)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            exc.exit_code = ExitCode.USAGE
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.exit_code = ExitCode.USAGE
            raise
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except QbitmapError as exc:
            ui = ctx.find_object(Ui) or Ui()
            ui.error(str(exc))
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            # `qbitmap dump ... | head`: the reader went away; not an error.
            _silence_stdout()
            ctx.exit(ExitCode.OK)
        except (OSError, MemoryError) as exc:
            if _debug(ctx):
                raise
            ui = ctx.find_object(Ui) or Ui()
            ui.error(f"{type(exc).__name__}: {exc}")
            ctx.exit(ExitCode.FAILED)
        except Exception as exc:
            if _debug(ctx):
                raise
            ui = ctx.find_object(Ui) or Ui()
            ui.error(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for details")
            ctx.exit(ExitCode.FAILED)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.meta.get("qbitmap.debug")) or os.environ.get("QBITMAP_DEBUG") == "1"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


@click.group(cls=QbitmapGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--color/--no-color",
    default=None,
    help="Force colour on or off (default: on for a terminal; NO_COLOR turns it off).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print no warnings or progress; errors still show.")
@click.option("--debug", is_flag=True, help="Show a traceback for internal errors.")
@click.version_option(__version__, "-V", "--version", prog_name="qbitmap")
@click.pass_context
def cli(ctx: click.Context, color: bool | None, quiet: bool, debug: bool) -> None:
    """Inspect, check and repair persistent dirty bitmaps in qcow2 images.

    \b
    qbitmap dump IMAGE       what the image says about its bitmaps
    qbitmap check IMAGE      validate them; exit code for scripts
    qbitmap recover IMAGE    bring in-use bitmaps back into service
    qbitmap checkpoints VM   libvirt's checkpoints of VM: will libvirt use them?

    Exit status: 0 success, 1 the image could not be read, 64 usage error;
    check and recover add their own (see their --help and qbitmap(1)).
    """
    ctx.meta["qbitmap.debug"] = debug
    ctx.obj = Ui(color=color, quiet=quiet)


def _register() -> None:
    # Command modules import their heavy dependencies lazily, inside the
    # command bodies, so registering all three costs little at start-up.
    from qbitmap.commands.check import check
    from qbitmap.commands.dump import dump
    from qbitmap.commands.recover import recover

    for command in (dump, check, recover):
        cli.add_command(command)

    from qbitmap.commands.checkpoints import checkpoints

    cli.add_command(checkpoints)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="qbitmap")
    except SystemExit as exc:
        from qbitmap import ui

        if not ui.fast_exit_allowed():
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(code)
