"""What the benches do to their argv before absl parses it: flags renamed to the project's vocabulary (--out,
--batch_size, --image_size...) end the program with one line naming the new one, instead of absl's "Unknown command
line flag" or a run that silently takes the default; and a bench's default config file is made explicit, so that
ml_collections parses `--config.<key>=` overrides of it when the flags are parsed (cli.parse_flags turns a bad one
into one line), not when the flag is defined (a traceback)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence


def _name(arg: str) -> str | None:
    return arg.lstrip("-").split("=", 1)[0] if arg.startswith("-") else None


def renamed_in(argv: Sequence[str], renamed: Mapping[str, str]) -> str | None:
    """The message for the first old flag name in argv[1:] (`--old`, `--old=v`, `-old`, `--noold`), else None."""
    for arg in argv[1:]:
        if arg == "--":  # absl: what follows is positional
            break
        name = _name(arg) or ""
        old = name if name in renamed else name[2:] if name.startswith("no") and name[2:] in renamed else None
        if old is not None:
            return f"--{old} was renamed --{renamed[old]}"
    return None


def with_config(argv: Sequence[str], default: str | os.PathLike) -> list[str]:
    """argv with `--config=default` first where it names no --config (overrides must follow the file)."""
    given = any(_name(a) == "config" for a in argv[1:] if a != "--")
    return list(argv) if given else [argv[0], f"--config={os.fspath(default)}", *argv[1:]]


def prepare(
    argv: Sequence[str], renamed: Mapping[str, str], default_config: str | os.PathLike | None = None
) -> list[str]:
    """argv for absl: exits with absl's one-line flag error on an old name; adds the default config file."""
    message = renamed_in(argv, renamed)
    if message:
        sys.exit(f"FATAL Flags parsing error: {message}")
    return with_config(argv, default_config) if default_config is not None else list(argv)
