"""Flags that changed name: the old spelling stops the program with one line naming the new flag,
instead of an "unknown flag" error that leaves the user to guess it.

Built on absl's own validators (the old flag is a string flag that is valid only while unset), so
programs keep absl's parser and the error reads like every other flag error.
"""

from absl import flags


def define_renamed(old: str, new: str, message: str = "", flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--old`, whose every use fails with `--old was renamed --new` (or `--old <message>`).

    Call it after defining `--new` and before marking `--new` required: the check covers both flags, so a
    command line that still says `--old` gets this one line rather than also "--new must have a value".
    """
    message = f"--{old} {message or f'was renamed --{new}'}"
    flags.DEFINE_string(old, None, f"Retired: {message}.", flag_values=flag_values)
    flags.register_multi_flags_validator(
        [old, new], lambda values: values[old] is None, message, flag_values=flag_values
    )
