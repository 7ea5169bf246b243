"""What every program shares on its command line: absl's flag parsing with readable config errors."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app


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


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with parse_flags."""
    app.run(main, flags_parser=parse_flags)
