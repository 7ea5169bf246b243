"""Joining a multi-process job as the config's `distributed` section (configs/common.py) says."""

from __future__ import annotations

from typing import Any

import jax
from absl import logging

from chexfound_jax.errors import ConfigError

MODES = ("auto", "always", "never")


def initialize(section: Any) -> None:
    """jax.distributed.initialize: auto-detected on TPU VMs and SLURM, explicit with a coordinator address
    (GPU clusters), skipped with initialize="never". "auto" runs a single process where no cluster is found."""
    if section.initialize not in MODES:
        raise ConfigError(f"distributed.initialize must be one of {MODES}, got {section.initialize!r}")
    if section.initialize == "never":
        return
    if section.coordinator_address:
        jax.distributed.initialize(
            section.coordinator_address, num_processes=section.num_processes, process_id=section.process_id
        )
    elif section.initialize == "always":
        jax.distributed.initialize()  # cluster auto-detection (TPU pod slice, SLURM, ...)
    else:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:  # no cluster environment: a single-process run
            logging.info("single process (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
