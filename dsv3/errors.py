"""The project's error base and the one place a command line turns errors into one-line messages.

Every error that means "your input or your environment is wrong" (a config field, a file, a
checkpoint, a request) derives from `Dsv3Error`; its message names the field, file or value. The
command-line entry points run through `run_cli`, which prints such an error as a single line
`prog: message` and returns exit code 2; anything else is a bug and keeps its traceback. `--debug`
(or DSV3_DEBUG=1) re-raises every error with its full trace.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


class Dsv3Error(Exception):
    """A user-facing error: bad input or environment. The message names the culprit."""


USAGE_EXIT = 2  # the exit code of every user error, as argparse uses for bad arguments


def one_line(message: object) -> str:
    """The message on one line (a multi-line message is joined with ' | ')."""
    return " | ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())


def run_cli(prog: str, main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a Dsv3Error (or a file that cannot be read: OSError, UnicodeDecodeError)
    becomes `prog: message` on stderr and exit code 2. `--debug` anywhere in argv (removed before
    `main` sees it) or DSV3_DEBUG=1 lets every exception through with its traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DSV3_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if debug:
        return main(args)
    try:
        return main(args)
    except Dsv3Error as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
    except (OSError, UnicodeDecodeError) as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
    return USAGE_EXIT
