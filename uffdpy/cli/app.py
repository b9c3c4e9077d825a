"""The ``uffdpy`` command: inspect, load, dump, benchmark, convert and make images.

Every command that reads an image takes a QEMU mapped-ram snapshot or an ELF
core (QEMU ``dump-guest-memory``, a process core); the format is recognised
from the file's first bytes.

Errors in the input give one line, ``uffdpy: error: FILE: WHAT (offset N)``,
and exit status 2; ``--debug`` (before or after the subcommand) shows the
traceback too.  Bad arguments are argparse's usage error, status 2.  Ctrl-C
ends with 130, SIGTERM with 143, a closed output pipe quietly with 141 (as a
tool killed by SIGPIPE), ``load --verify`` finding a mismatch with 1.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import bench, inspect, load, make, resume
from .args import Command, printable
from ..errors import UffdpyError

__all__ = ["main", "build_parser", "COMMANDS"]

#: The commands, in ``uffdpy --help`` order (``ws`` and ``plot`` come from :mod:`.ws`).
COMMANDS: Tuple[Command, ...] = (inspect.COMMANDS + load.COMMANDS + resume.COMMANDS
                                 + bench.COMMANDS + make.COMMANDS)


def build_parser(command_name: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``uffdpy`` parser; with ``command_name``, only that command (the others
    are not needed to run it: each parser costs start-up time, mostly argparse's
    translation look-ups)."""
    p = _Parser(prog="uffdpy", description=(
        "Lazy loading of QEMU mapped-ram snapshots and ELF memory images with userfaultfd."))
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug after the subcommand too; SUPPRESS keeps a top-level --debug
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser = sub.add_parser

    commands: Dict[str, argparse.ArgumentParser] = {}

    def add_command(name: str, **kw: Any) -> argparse.ArgumentParser:
        commands[name] = add_parser(name, parents=[common], **kw)
        return commands[name]

    sub.add_parser = add_command  # type: ignore[method-assign, assignment]
    for command in COMMANDS:
        if command_name in (None, command.name):
            sp = sub.add_parser(command.name, **command.parser)
            command.arguments(sp)
            sp.set_defaults(func=command.run, _check=command.check)
    if command_name is None:
        from .ws import add_parsers
        add_parsers(sub)                # ws inspect, ws merge, plot
    p.set_defaults(_commands=commands)  # each command's own parser, for its usage errors
    return p


class _Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose help formatter is told the terminal's width:
    argparse makes a formatter for every argument added, and each one left to find
    the width itself imports :mod:`shutil` (and with it bz2 and lzma) at start-up."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=_help_width())  # type: ignore[call-arg]


def _help_width() -> int:
    """What argparse would use: ``$COLUMNS``, else the terminal's width, else 80; less 2."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns \
                if sys.__stdout__ is not None else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns if columns > 0 else 80) - 2


def _one_line(exc: BaseException) -> str:
    from ..pagesource import ImageError
    if isinstance(exc, ImageError):
        what = exc.what
        if exc.expected is not None or exc.actual is not None:
            what += f": expected {exc.expected}, got {exc.actual}"
        if exc.hint:
            what += f"; {exc.hint}"
        where = f" (offset {exc.offset})" if exc.offset is not None else ""
        return f"{exc.path}: {what}{where}"
    if isinstance(exc, OSError) and exc.filename and not str(exc).startswith(str(exc.filename)):
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror and str(exc).startswith("[Errno"):
        return exc.strerror                   # the message, without Python's errno prefix
    return str(exc) or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    named = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(named if any(c.name == named for c in COMMANDS) else None)
    # everything after the first "--" is a QEMU command line (resume), never options of ours
    qemu_cmd: List[str] = []
    if "--" in words:
        cut = words.index("--")
        words, qemu_cmd = words[:cut], words[cut + 1:]
    args, extra = parser.parse_known_args(words)
    own = args._commands.get(args.command, parser)     # errors with the command's own usage
    if extra and args.command == "resume":
        own.error(f"unexpected arguments {' '.join(extra)!r}: a QEMU command goes after --, "
                  "as in: uffdpy resume SNAP -- qemu-system-x86_64 ARGS...")
    if extra:
        own.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "qemu"):
        args.qemu = qemu_cmd
    elif qemu_cmd:
        own.error("unexpected arguments after -- (only resume takes a QEMU command)")
    if getattr(args, "_check", None):
        args._check(args, own)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        outcome = args.func(args)
        print(outcome.render(getattr(args, "json", False)))
        sys.stdout.flush()                  # a closed pipe shows here, not at exit
        return outcome.status
    except BrokenPipeError:
        # The reader went away (``uffdpy inspect X | head``): stop quietly, as
        # a tool killed by SIGPIPE would, and keep the interpreter's final
        # flush of stdout from complaining (Python's documented pattern).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as exc:      # Ctrl-C, and SIGTERM as _Terminated
        if exc.args and isinstance(exc.args[0], str):
            print(f"uffdpy: {printable(exc.args[0])}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else 130
    except MemoryError:
        if args.debug:
            import traceback
            traceback.print_exc()
        print(f"uffdpy: error: out of memory in {args.command}", file=sys.stderr)
        return 2
    except (UffdpyError, ValueError, OSError) as exc:
        # uffdpy's own errors, bad values and the system's: one line.  Anything
        # else (a TypeError, a KeyError, a RuntimeError) is a bug in uffdpy and
        # shows its traceback.
        if args.debug:
            import traceback
            traceback.print_exc()
        msg = _one_line(exc)
        print(f"uffdpy: error: {printable(msg)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``finally`` cleans up."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()
