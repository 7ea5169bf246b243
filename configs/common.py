"""Config sections that pretraining and evaluation share: one definition, the same defaults."""

import ml_collections


def distributed() -> ml_collections.ConfigDict:
    """How a process joins a multi-process job (chexfound_jax.parallel.distributed)."""
    return ml_collections.ConfigDict(
        dict(
            initialize="auto",  # "auto": cluster auto-detection (TPU VM, SLURM) when present; "never"; "always"
            coordinator_address="",  # GPU clusters without auto-detection: host:port of process 0
            num_processes=ml_collections.FieldReference(None, field_type=int),  # with coordinator_address
            process_id=ml_collections.FieldReference(None, field_type=int),
        )
    )
