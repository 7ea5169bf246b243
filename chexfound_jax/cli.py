"""What every program shares on its command line: absl's flag parsing with readable config errors, a default
config file that parses like a given one, and logs that show the job's own progress (library INFO records only
with --verbosity=1). Flags that changed name are retired with data_prep.retired_flags.define_renamed."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app
from absl import logging as absl_logging

# The project's own code: its INFO records are the job's progress, kept at the default verbosity.
_REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT_ROOTS = tuple(str(_REPO / d) for d in ("chexfound_jax", "data_prep", "bench"))


class LibraryInfoFilter(logging.Filter):
    """Drops INFO and DEBUG records of libraries (orbax, grain, tfds, jax...) unless --verbosity >= 1."""

    def __init__(self, roots: Sequence[str] = PROJECT_ROOTS):
        super().__init__()
        self.roots = tuple(roots)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= 1:
            return True
        return _real_path(record.pathname).startswith(self.roots)


@functools.lru_cache(maxsize=1024)
def _real_path(path: str) -> str:
    """Resolved once per source file, not once per log record."""
    return str(pathlib.Path(path).resolve())


def _innermost(error: BaseException) -> str:
    """ml_collections wraps a KeyError in an AttributeError whose text is the KeyError's repr; unwrap it."""
    message: object = error
    while isinstance(message, BaseException) and message.args:
        message = message.args[0]
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parser; a `--config.<key>=` override that names no key of the config, or whose value does
    not fit, ends the program with one line naming it instead of a traceback."""
    try:
        return app.parse_flags_with_usage(list(argv))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        what = "unknown config key " if isinstance(e, (AttributeError, KeyError)) else ""
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"FATAL Flags parsing error: {what}{_innermost(e)} (in {', '.join(overrides) or 'the config'})")


def with_default_config(argv: Sequence[str], default: str | os.PathLike) -> list[str]:
    """argv with `--config=default` first where it names no --config (its overrides must follow the file).

    ml_collections loads a config flag's default when the flag is defined, and applies `--config.<key>=`
    overrides of it there too, so a bad override of the default is a traceback that parse_flags never sees;
    named on the command line, the file loads, and its overrides apply, when the flags are parsed.
    """
    given = any(_flag_name(a) == "config" for a in argv[1 : argv.index("--") if "--" in argv else None])
    return list(argv) if given else [argv[0], f"--config={os.fspath(default)}", *argv[1:]]


def _flag_name(arg: str) -> str | None:
    return arg.lstrip("-").split("=", 1)[0] if arg.startswith("-") else None


def run(main: Callable[[list[str]], None], default_config: str | os.PathLike | None = None) -> None:
    """app.run(main) with parse_flags, and library INFO records filtered out of the log.

    default_config: the config file of a program whose --config is optional. Define --config with no default
    (None) and name the default here: it is then put on the command line (with_default_config).
    """

    def quiet_main(argv: list[str]) -> None:
        absl_logging.get_absl_handler().addFilter(LibraryInfoFilter())
        main(argv)

    if default_config is not None:
        sys.argv = with_default_config(sys.argv, default_config)  # ml_collections reads its overrides in sys.argv
    app.run(quiet_main, flags_parser=parse_flags)
