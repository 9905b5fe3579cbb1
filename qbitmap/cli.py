"""Command line: a click group with ``dump``, ``check`` and ``recover``.

Thin by design: each command lives in ``qbitmap/commands/`` and only opens
the image, calls the library, hands results to a renderer and picks the exit
code.  This module ends every run in one place, :meth:`QbitmapGroup.main`:

* usage errors exit 64 (click's 2 is ``check``'s "corrupt");
* a QbitmapError is one line on stderr naming the file, with its own code;
  anything unexpected is one line too unless ``--debug`` (or
  QBITMAP_DEBUG=1) asks for the traceback;
* Ctrl-C is ``qbitmap: interrupted`` and exit 130, after open images are
  closed and locks released;
* a reader that closes stdout early (``| head``) ends the command quietly
  with exit 0, whatever the output form;
* ``check --json`` and ``recover --json`` print one JSON object on stdout
  for every exit status, failures included.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading
from itertools import pairwise
from typing import Any

import click

from qbitmap import __version__
from qbitmap.commands import PARAMS_KEY
from qbitmap.errors import ExitCode, QbitmapError
from qbitmap.interrupt import exit_interrupted
from qbitmap.ui import Ui

# numpy's OpenBLAS starts a thread pool when numpy is imported, which costs
# tens of milliseconds per run (measured on bench_dump); qbitmap does no linear algebra.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

INTERRUPTED = ExitCode.INTERRUPTED

#: Commands that answer in JSON for every exit status when given ``--json``.
JSON_COMMANDS = ("check", "recover")


class _Run:
    """One invocation: what it was asked, for the failure paths."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.ctx: click.Context | None = None

    @property
    def params(self) -> dict[str, Any] | None:
        """The command's parsed parameters, once its parsing succeeded."""
        return None if self.ctx is None else self.ctx.meta.get(PARAMS_KEY)

    @property
    def ui(self) -> Ui:
        found = None if self.ctx is None else self.ctx.find_object(Ui)
        return found or Ui()

    @property
    def debug(self) -> bool:
        return (
            bool(self.ctx is not None and self.ctx.meta.get("qbitmap.debug"))
            or os.environ.get("QBITMAP_DEBUG") == "1"
        )

    def command(self) -> str | None:
        """The command word: the first argument that is not an option (global ones take none)."""
        for arg in self.args:
            if arg == "--":
                return None
            if not arg.startswith("-"):
                return arg
        return None

    def json_command(self) -> str | None:
        """``check`` or ``recover`` when the run asked for JSON, else None.

        From the parsed parameters when parsing got that far, else from the
        words of the command line (a usage error with ``--json`` among them
        still gets its JSON object).
        """
        command = self.command()
        if command not in JSON_COMMANDS:
            return None
        params = self.params
        if params is not None:
            return command if params.get("as_json") else None
        words = self.args[self.args.index(command) + 1 :]
        words = words[: words.index("--")] if "--" in words else words
        asked = "--json" in words or "--output=json" in words
        asked = asked or any(a == "--output" and b == "json" for a, b in pairwise(words))
        return command if asked else None

    def image(self) -> object | None:
        """The one image the command was given (None for none, or for several)."""
        params = self.params or {}
        if params.get("image") is not None:
            return params["image"]
        images = params.get("images") or ()
        return images[0] if len(images) == 1 else None

    def name_the_file(self, message: str) -> str:
        """*message*, led by the file it is about unless it names one already."""
        params = self.params or {}
        image, reference = self.image(), params.get("reference")
        named = [str(p) for p in (image, reference) if p is not None]
        if not named or any(name in message for name in named):
            return message
        if reference is not None:
            return f"{image} (reference {reference}): {message}"
        return f"{image}: {message}"

    def fail(self, code: int, message: str) -> int:
        """One error line on stderr and, with ``--json``, a JSON object on stdout."""
        self.ui.error(message)
        self.write_json_failure(code, message)
        return code

    def interrupted(self) -> int:
        # A second Ctrl-C must not break the line or the JSON being written: the run is ending.
        _set_sigint(signal.SIG_IGN)
        sys.stderr.write("qbitmap: interrupted\n")
        sys.stderr.flush()
        self.write_json_failure(INTERRUPTED, "interrupted")
        return INTERRUPTED

    def write_json_failure(self, code: int, message: str) -> None:
        command = self.json_command()
        if command is None:
            return
        params = self.params or {}
        image = self.image()
        filename = None if image is None else str(image)
        try:
            if command == "check":
                from qbitmap.render.check import write_failure_json

                write_failure_json(sys.stdout, filename, code, message)
            else:
                from qbitmap.render.recover import write_failure_json as write_recover_failure

                write_recover_failure(
                    sys.stdout, filename, bool(params.get("dry_run")), code, message
                )
            sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()


#: The commands, in the order --help lists them, and the module defining each (as a function
#: of the same name).  A run imports and builds only the command it runs.
COMMANDS = {
    "dump": "qbitmap.commands.dump",
    "check": "qbitmap.commands.check",
    "recover": "qbitmap.commands.recover",
    "checkpoints": "qbitmap.commands.checkpoints",
}


class QbitmapGroup(click.Group):
    """Ends every run: maps usage errors, QbitmapError, Ctrl-C and closed pipes onto exit codes.

    Commands load on first use (:data:`COMMANDS`): a backup job calls qbitmap
    once per disk, and building every command's options costs each call.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module = importlib.import_module(COMMANDS[cmd_name])
            self.add_command(getattr(module, cmd_name))
        return self.commands.get(cmd_name)

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        run = _Run(sys.argv[1:] if args is None else list(args))
        prog_name = prog_name or "qbitmap"
        self._main_shell_completion(extra, prog_name, complete_var)
        # While the command runs, Ctrl-C raises KeyboardInterrupt so that `with` blocks
        # close images and release locks; the entry point's handler is back afterwards.
        previous = _set_sigint(signal.default_int_handler)
        code: int | Any = ExitCode.OK
        try:
            code = self._run(run, prog_name, extra)
        except KeyboardInterrupt:
            code = run.interrupted()
        finally:
            if code != INTERRUPTED and previous is not None:
                _set_sigint(previous)
        sys.exit(code)

    def _run(self, run: _Run, prog_name: str, extra: dict[str, Any]) -> Any:
        try:
            with self.make_context(prog_name, list(run.args), **extra) as ctx:
                run.ctx = ctx
                rv = self.invoke(ctx)
                return rv if isinstance(rv, int) else ExitCode.OK
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: bare `qbitmap`
                sys.stderr.write(exc.format_message() + "\n")
                return ExitCode.USAGE
            # One line, like every other error (click's own form takes four).
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            return run.fail(ExitCode.USAGE, f"{_one_line(exc.format_message())}{hint}")
        except click.exceptions.Abort:
            return run.fail(ExitCode.FAILED, "aborted")
        except click.ClickException as exc:
            return run.fail(exc.exit_code, _one_line(exc.format_message()))
        except QbitmapError as exc:
            return run.fail(exc.exit_code, run.name_the_file(str(exc)))
        except OSError as exc:
            if _is_closed_pipe(exc):
                # `qbitmap dump ... | head`: the reader went away; not an error.
                silence_stdout()
                return ExitCode.OK
            if run.debug:
                raise
            return run.fail(ExitCode.FAILED, run.name_the_file(f"{type(exc).__name__}: {exc}"))
        except MemoryError as exc:
            if run.debug:
                raise
            return run.fail(ExitCode.FAILED, run.name_the_file(f"MemoryError: {exc}"))
        except Exception as exc:
            if run.debug:
                raise
            return run.fail(
                ExitCode.FAILED,
                run.name_the_file(
                    f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for details"
                ),
            )

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


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _set_sigint(handler: Any) -> Any:
    """Install *handler* for SIGINT and return the previous one (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _is_closed_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno == errno.EPIPE
    )


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing (not even the final flush) writes to a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


@click.group(cls=QbitmapGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--color/--no-color",
    default=None,
    help="Force colour on or off (default: on for a terminal; NO_COLOR turns it off).",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Print no warnings or progress; errors still show."
)
@click.option("--debug", is_flag=True, help="Show a traceback for internal errors.")
@click.version_option(__version__, "-V", "--version", prog_name="qbitmap")
@click.pass_context
def cli(ctx: click.Context, color: bool | None, quiet: bool, debug: bool) -> None:
    """Inspect, check and repair persistent dirty bitmaps in qcow2 images.

    \b
    qbitmap dump IMAGE...    what the images say about their bitmaps
    qbitmap check IMAGE...   validate them; exit code for scripts
    qbitmap recover IMAGE    bring in-use bitmaps back into service
    qbitmap checkpoints VM   libvirt's checkpoints of VM: will libvirt use them?

    Exit status: 0 success, 1 the image could not be read, 64 usage error,
    130 interrupted; check and recover add their own (see their --help and
    qbitmap(1)).
    """
    ctx.meta["qbitmap.debug"] = debug
    ctx.obj = Ui(color=color, quiet=quiet)


def main() -> None:
    """Run the command line and end the process (the console entry point is qbitmap.entry)."""
    try:
        cli(prog_name="qbitmap")
        code: int = ExitCode.OK
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # The command has returned: from here on Ctrl-C ends the process at once.
    _set_sigint(exit_interrupted)
    closed = False
    try:
        # After Ctrl-C what is left in stdout's buffer is dropped: a reader that has
        # stopped reading must not keep an interrupted process waiting.
        if code != INTERRUPTED:
            sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        closed = True
    except OSError as exc:
        if not _is_closed_pipe(exc):
            raise
        closed = True
    if closed:
        silence_stdout()
        code = ExitCode.OK
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    from qbitmap import ui

    if ui.fast_exit_allowed() or closed or code == INTERRUPTED:
        os._exit(code)
    sys.exit(code)
