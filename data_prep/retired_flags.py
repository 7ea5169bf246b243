"""Flags that changed name: the old spelling stops the program with one line naming the new flag,

    FATAL Flags parsing error: --old was renamed --new

instead of absl's "Unknown command line flag" or a run that silently takes a default. Every program of the
project (data_prep, chexfound_jax, bench) retires its old flag names through `define_renamed`, so the line
reads the same everywhere.

The old name stays defined, as a flag whose parser ends the program. absl calls it while it parses, for every
spelling (`--old=v`, `--old v`, `-old=v`, `--old`, `--noold`: the flag is boolean-like, so no spelling needs a
value and none is left over as an unknown flag), and before any validator runs, so a required new flag does not
add "flag --new must have a value" and the line is the only one. Define retired flags in a program's
define_flags(), as the others: a library that imports the module must not get them.
"""

from absl import flags

_PREFIX = "FATAL Flags parsing error: "  # absl's own, so the line reads as any other flag error


class _Retired(flags.ArgumentParser):
    """Parses nothing: any value ends the program with the flag's message."""

    def __init__(self, message: str):
        self.message = message

    def parse(self, argument: str) -> None:
        raise SystemExit(_PREFIX + self.message)

    def flag_type(self) -> str:
        return "retired"


def renamed_message(old: str, new: str, message: str = "") -> str:
    """`--old was renamed --new`, or `--old <message>` (e.g. "was replaced by --new=a|b")."""
    return f"--{old} {message or f'was renamed --{new}'}"


def define_renamed(old: str, new: str, message: str = "", flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--old`, whose every use ends the program with `FATAL Flags parsing error: --old was renamed --new`
    (or `--old <message>`) on stderr and exit status 1, as absl's flag errors."""
    if new not in flag_values:
        raise ValueError(f"--{old} is renamed --{new}, which is not defined (define it first)")
    text = renamed_message(old, new, message)
    flag = flags.Flag(_Retired(text), None, old, None, f"Retired: {text}.", boolean=True)
    flags.DEFINE_flag(flag, flag_values)
