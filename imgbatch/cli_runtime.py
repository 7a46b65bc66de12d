"""How a command runs: one stderr line and an exit code for every failure, stdout for
data, the app of the command being run, and the console-script entry point.

cli.py declares the commands; this module is what each of them runs inside.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from imgbatch.cli_options import Shared
from imgbatch.errors import ExitCode, ImgbatchError, OutputClosed, SignalStop, WaitInterrupted
from imgbatch.output import JsonlSink, close_quietly, setup_logging
from imgbatch.signals import Signals, must_exit_now

log = logging.getLogger("imgbatch")

APP_SETTINGS: dict[str, Any] = {
    "name": "imgbatch",
    "help": "Hash and analyse huge image folders, resumably, as JSON Lines on stdout.",
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
}


def exit_now(code: int) -> None:
    """Exit with `code`, without joining threads still blocked in a request."""
    if must_exit_now():
        os._exit(code)
    raise typer.Exit(code)


@contextmanager
def command(cmd: Shared) -> Iterator[Signals]:
    """Run a command body: every failure becomes one stderr line and an exit code.

    Yields the signal handling: SIGINT/SIGTERM end the command with 130/143 (a command
    with a graceful stop sets `graceful`).
    """
    if cmd.log_format not in ("text", "json"):
        setup_logging()
        log.error("error: --log-format must be text or json")
        raise typer.Exit(int(ExitCode.USAGE))
    setup_logging(cmd.verbose, cmd.quiet, cmd.log_format)
    debug = cmd.verbose or os.environ.get("IMGBATCH_DEBUG") == "1"
    signals = Signals(graceful=False).install()
    try:
        yield signals
    except WaitInterrupted as exc:  # a stop before anything was done (waiting for the lock)
        log.error("%s", exc)
        raise typer.Exit(signals.exit_code or int(exc.exit_code)) from None
    except ImgbatchError as exc:
        if debug:
            traceback.print_exc()
        log.error("error: %s", exc)
        raise typer.Exit(int(exc.exit_code)) from None
    except OutputClosed:
        raise typer.Exit(int(ExitCode.OK)) from None
    except SignalStop as exc:
        log.error("interrupted")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        log.error("interrupted")
        raise typer.Exit(int(ExitCode.SIGINT)) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # typer's own exits and usage errors
    except Exception as exc:  # a bug, or a failure nothing above knew to expect
        if debug:
            traceback.print_exc()
        log.error("error: %s", unexpected(exc))
        raise typer.Exit(int(ExitCode.FATAL)) from None


def unexpected(exc: BaseException) -> str:
    """One line for an exception nobody expected: its type and message."""
    message = " ".join(str(exc).split())
    return f"unexpected {type(exc).__name__}" + (f": {message}" if message else "")


@contextmanager
def stdout() -> Iterator[JsonlSink]:
    """stdout for a command's data: a closed pipe raises OutputClosed (a quiet exit 0),
    a failing one OutputError (exit 5). Nothing goes through sys.stdout, so the
    interpreter's exit flush has nothing left to fail on."""
    sink = JsonlSink(flush_every=100)
    try:
        yield sink
    except BaseException:
        close_quietly(sink.close)
        raise
    sink.close()


def print_lines(lines: Iterable[str]) -> None:
    """Text lines to stdout (through stdout)."""
    with stdout() as out:
        for line in lines:
            # surrogateescape: a file name that is not UTF-8 comes out as its own bytes
            out.write(line.encode("utf-8", "surrogateescape") + b"\n")


def finish(lines: list[str], code: int, signals: Signals | None = None) -> None:
    """Log a run's summary lines and exit with its code (returning on 0); after a
    graceful stop, with the signal's."""
    for line in lines:
        log.info("%s", line)
    if signals is not None and signals.exit_code is not None:
        exit_now(signals.exit_code)
    if code:
        raise typer.Exit(code)


def app_for(app: typer.Typer, argv: list[str]) -> typer.Typer:
    """The app that runs `argv`: for `imgbatch COMMAND ...`, one with COMMAND alone
    (typer reads the signature of every registered command before it parses anything,
    ~40 ms of a re-scan that takes a few hundred); else the whole app (help, errors)."""
    name = argv[1] if len(argv) > 1 else ""
    chosen = [
        info
        for info in app.registered_commands
        if name == (info.name or getattr(info.callback, "__name__", "").replace("_", "-"))
    ]
    if not chosen:
        return app
    one = typer.Typer(**APP_SETTINGS)
    one.registered_callback = app.registered_callback
    one.registered_commands = chosen
    return one


def query_last(app: typer.Typer, argv: list[str]) -> list[str]:
    """`imgbatch search ROOT red -car`: a word starting with "-" that is no option of
    `search` is a query word (an exclusion), so the words go after a "--" in their order,
    the options before it (click would otherwise take `-car` for an unknown option)."""
    if len(argv) < 3 or argv[1] != "search" or "--" in argv:
        return argv
    command = typer.main.get_command(app_for(app, argv))
    params = getattr(command, "commands", {}).get("search", command).params
    takes_value = {
        name: not getattr(p, "is_flag", False) and not getattr(p, "count", False)
        for p in params
        if p.param_type_name == "option"
        for name in (*p.opts, *p.secondary_opts)
    }
    takes_value["--help"] = False  # click's own, not among the parameters
    options: list[str] = []
    words: list[str] = []
    rest = iter(argv[2:])
    for token in rest:
        name = token.split("=", 1)[0]
        if name in takes_value:
            options.append(token)
            if takes_value[name] and "=" not in token:
                options.append(next(rest, ""))
        else:
            words.append(token)
    return [argv[0], argv[1], *options, "--", *words]


def main(app: typer.Typer) -> None:
    """The console-script entry point, running `app` (the one command asked for)."""
    try:
        sys.argv = query_last(app, sys.argv)
        app_for(app, sys.argv)()
    except KeyboardInterrupt:  # before a command's own handler is in place
        sys.exit(int(ExitCode.SIGINT))
    except SignalStop as exc:  # after it (a signal while the process ends)
        sys.exit(exc.exit_code)
    except Exception as exc:  # outside a command's own handler (start-up, option parsing)
        if os.environ.get("IMGBATCH_DEBUG") == "1":
            traceback.print_exc()
        sys.stderr.write(f"imgbatch: error: {unexpected(exc)}\n")
        sys.exit(int(ExitCode.FATAL))
