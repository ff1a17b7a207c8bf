"""Every command line of dwise_jax, one way: absl flags on a `FlagValues` of the command's own.
A command module defines `define_flags(fv)` and `run(fv, args) -> int` and ends with
`cli.main(__doc__, define_flags, run, errors=(...))`; tests run it in-process with `cli.call`.
Usage errors exit 2, `errors` exit 1, one `error:` line each (docs/design.md#command-lines)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

Define = Callable[[flags.FlagValues], None]
Run = Callable[[flags.FlagValues, list[str]], int]


class UsageError(ValueError):
    """A flag combination the command cannot run with (exit 2)."""


def call(define: Define, run: Run, args: Sequence[str], program: str = "dwise_jax",
         doc: str | None = None, errors: tuple[type[BaseException], ...] = (),
         check: Callable[[list[str]], None] | None = None) -> int:
    """Parses `args` (no program name) and runs the command; usage and user errors -> one line
    on stderr. `check(args)` may raise one of `errors` from the raw arguments, before parsing.
    `--help` prints `doc` and one line per flag with its default."""
    fv = flags.FlagValues()
    define(fv)
    if {"--help", "-h", "--helpfull"} & set(args):
        print((doc or "").strip() + "\n\nflags:")
        for flag in sorted({fv[name] for name in fv}, key=lambda f: f.name):
            print(f"  --{flag.name}: {flag.help} (default: {flag.default!r})")
        return 0
    if not flags.FLAGS.is_parsed():  # absl logging and Grain's workers read the global flags
        flags.FLAGS.mark_as_parsed()
    try:
        if check is not None:
            check(list(args))
        # ml_collections' config flag reads its `--config.KEY=value` overrides from sys.argv:
        # in process (tests, notebooks) that must be this command's arguments while parsing.
        saved, sys.argv = sys.argv, [program, *args]
        try:
            positional = fv([program, *args])[1:]
        finally:
            sys.argv = saved
        return run(fv, positional)
    except (flags.Error, UsageError) as e:
        print(f"error: {e} (see --help)", file=sys.stderr)
        return 2
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(doc: str | None, define: Define, run: Run,
         errors: tuple[type[BaseException], ...] = (),
         check: Callable[[list[str]], None] | None = None) -> None:
    """The `python -m` entry: parses sys.argv and exits with the command's status."""
    sys.exit(call(define, run, sys.argv[1:], sys.argv[0], doc, errors, check))
