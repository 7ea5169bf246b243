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


def parallel(mesh: dict[str, int] | None = None, rules: str = "data_parallel") -> ml_collections.ConfigDict:
    """Where arrays live (chexfound_jax.parallel): mesh axis sizes (-1: the remaining devices) over
    (data, fsdp[, tensor]) and the rule table mapping logical axis names to them ("data_parallel": every
    parameter replicated; "fsdp": parameters and optimiser state split over `fsdp`)."""
    return ml_collections.ConfigDict(dict(mesh=dict(mesh or dict(data=-1, fsdp=1)), rules=rules))
