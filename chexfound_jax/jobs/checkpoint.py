"""Checkpoints of any job: its whole state (a pretraining TrainState, a head bank), the data-iterator
position and the config, per step.

A thin wrapper around `orbax.checkpoint.CheckpointManager`, so that resuming is exact (every state
leaf, including the optimiser state, the raw PRNG key and the centres, plus where the input pipeline
was) and preemption-safe. One step directory holds three items:

    <directory>/<step>/state   the TrainState (orbax StandardSave: sharded arrays, OCDBT)
    <directory>/<step>/data    the data iterator's `get_state()` dict (JSON)
    <directory>/<step>/config  the run's config, `cfg.to_dict()` (JSON; tuples come back as lists)

Atomicity is orbax's: a step is written under `<step>.orbax-checkpoint-tmp` and renamed when complete
(on GCS, where renames are not atomic, a `commit_success.txt` marks completion instead), and only
finalised steps are ever listed, so a save killed half-way is never picked up as the latest; its
leftovers are removed when the next Checkpointer opens the directory.

Retention uses orbax's preservation policies (`LatestN` or'ed with `EveryNSteps`), the documented
replacement for `CheckpointManagerOptions.max_to_keep`/`keep_period`, which orbax 0.12.8 marks
deprecated. A step is kept if it is among the last `keep_last` saved or a multiple of `keep_every`;
`keep_last` counts all saved steps, the periodic ones included (so saving 1..9 with keep_last=2,
keep_every=4 keeps {4, 8, 9}).

Restoring reads each array straight into the target sharding (abstract arrays carrying the new mesh's
NamedShardings), so a checkpoint written on one mesh restores onto another size or layout.

A step whose files are damaged (truncated by a bad disk or an interrupted copy between buckets) is told
apart from one written by another configuration: its saved metadata cannot be read, or matches this run's
state while its arrays cannot be. `restore_newest` then names the damaged files, renames the step to
`<step>.damaged` (nothing is deleted) and falls back to the newest step that restores whole.

Multi-process: every process must construct the Checkpointer and call `save`, `restore`, `wait` and
`close` at the same steps (orbax runs collective barriers inside them; each process writes its own
shards and the primary process alone writes metadata and finalises). Nothing here is process-0-only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision_lib

from chexfound_jax.parallel import sharding

STATE, DATA, CONFIG = "state", "data", "config"
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")  # orbax's JSON bookkeeping


class DamagedCheckpointError(ValueError):
    """No saved step restores whole; the message names the damaged files of each."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape} of every leaf: a dataclass state and orbax's nested-dict metadata compare equal."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _files(directory: epath.Path) -> list[epath.Path]:
    """Every file under `directory` (epath globs are not recursive on GCS by design; a step holds few files)."""
    out = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        out.extend(_files(entry) if entry.is_dir() else [entry])
    return out


def damaged_files(step_dir: epath.Path, error: BaseException | None = None) -> list[str]:
    """Files of a step directory that cannot be read: empty files, orbax JSON files that do not parse, and
    the files a restore error names."""
    bad = set()
    for f in _files(step_dir):
        if f.stat().length == 0:
            bad.add(str(f))
        elif f.name in _JSON_FILES or f.parent.name == "array_metadatas":
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                bad.add(str(f))
    if error is not None:
        bad.update(m for m in re.findall(r'local file "([^"]+)"', str(error)) if epath.Path(m).is_file())
    return sorted(bad)


def _save_replicated_arrays_whole_on_cpu() -> None:
    """On CPU, writes a replicated array from its first replica instead of slicing it across replicas.

    orbax's replica-parallel save cuts every replicated array into one slice per device, each an eager
    `lax.slice` dispatch, so that devices share the device-to-host copy. CPU "devices" share host memory,
    so the slices buy nothing and cost seconds per save (8.5 s of a 0.5 s save for the tiny config on 8
    CPU devices). orbax itself turns replica-parallel off for GPUs. The files are the same either way.
    """
    if jax.default_backend() == "cpu":
        handler = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
        )
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
    """Saves and restores (TrainState, data-iterator state, config) under `directory` (local or gs://).

    Args:
      directory: root holding one sub-directory per saved step; created if missing.
      save_every: `should_save(step)` is True at multiples of this (and when a preemption notice
        has reached every process, via jax's preemption sync point).
      keep_last: how many of the most recent steps to keep.
      keep_every: also keep every step that is a multiple of this (None or 0: none beyond keep_last).
      async_save: if True, `save` returns once the arrays are copied off the devices and writes in a
        background thread; call `wait()` (or `close()`) before reading the files or exiting.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        save_every: int,
        keep_last: int,
        keep_every: int | None = None,
        async_save: bool = True,
    ):
        if save_every < 1 or keep_last < 1 or (keep_every or 0) < 0:
            raise ValueError(f"save_every={save_every}, keep_last={keep_last}, keep_every={keep_every} must be >= 1")
        _save_replicated_arrays_whole_on_cpu()
        path = epath.Path(directory)
        self.directory = path if "://" in str(directory) else path.resolve()  # orbax wants absolute local paths
        preserve: list[Any] = [preservation_lib.LatestN(keep_last)]
        if keep_every:
            preserve.append(preservation_lib.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision_lib.AnySavePolicy(
                [save_decision_lib.FixedIntervalPolicy(save_every), save_decision_lib.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=preservation_lib.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of saves killed mid-write
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def should_save(self, step: int) -> bool:
        """True at multiples of `save_every` (or on preemption), and only past the latest saved step."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], config: Any, *, force: bool = False) -> bool:
        """Starts saving `step` if `should_save(step)` or `force`; returns whether it did.

        `state` may be donated to the next train step as soon as this returns: orbax has copied the
        arrays to host memory by then. `config` is an ml_collections ConfigDict or a JSON-able dict.
        """
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # Fail here, not in the background thread, if either item is not JSON-able.
        data_json, config_json = json.loads(json.dumps(dict(data_state))), json.loads(json.dumps(config_dict))
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: ocp.args.JsonSave(data_json),
                    CONFIG: ocp.args.JsonSave(config_json),
                }
            ),
            force=force,
        )

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is finalised (and old steps deleted)."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest finalised step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finalised steps still on disk, ascending."""
        return sorted(self._manager.all_steps())

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no finished checkpoint for step {step} in {self.directory}")
        return step

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config dict saved with `step` (default: the latest), without reading the state."""
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def restore(
        self, step: int | None = None, *, abstract_state: Any, shardings: Any
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data_state, config dict) of `step` (default: the latest).

        `abstract_state` gives the tree structure, shapes and dtypes (e.g. `Training.abstract_state`)
        and `shardings` the matching tree of target shardings (`Training.state_shardings`); arrays are
        read directly into those shardings, whatever mesh wrote them. A checkpoint whose arrays do not
        fit `abstract_state` (another model or head configuration) is refused with a ValueError naming it;
        one whose files are damaged raises DamagedCheckpointError naming them.
        """
        step = self._step(step)
        target = sharding.with_shardings(abstract_state, shardings)
        args = {STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore(), CONFIG: ocp.args.JsonRestore()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # told apart below: a mismatch or damage is re-raised as such
            if self._saved_shapes(step) not in (None, _shapes(abstract_state)):
                raise ValueError(
                    f"{self.directory} step {step} does not fit this run's state, so it was written by another "
                    f"configuration: use a new directory or remove it ({e})"
                ) from e
            files = damaged_files(self.directory / str(step), e)
            raise DamagedCheckpointError(
                f"{self.directory} step {step} is damaged: {', '.join(files) or 'unreadable'} ({str(e)[:300]})"
            ) from e
        return restored[STATE], restored[DATA], restored[CONFIG]

    def restore_newest(self, *, abstract_state: Any, shardings: Any) -> tuple[int, Any, dict, dict]:
        """(step, state, data_state, config) of the newest step that restores whole. A damaged step is
        logged with its damaged files and skipped (and kept on disk); a configuration mismatch raises."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        problems = []
        for step in steps:
            try:
                state, data, config = self.restore(step, abstract_state=abstract_state, shardings=shardings)
            except DamagedCheckpointError as e:
                aside = self._set_aside(step)
                logging.warning("skipping a damaged checkpoint, kept as %s: %s", aside, e)
                problems.append(str(e))
                continue
            if problems:
                logging.warning("resumed from step %d, the newest checkpoint that restores whole", step)
            return step, state, data, config
        raise DamagedCheckpointError("no checkpoint restores whole:\n" + "\n".join(problems))

    def _set_aside(self, step: int) -> epath.Path:
        """Renames a damaged step directory to `<step>.damaged` (kept for inspection; orbax lists only step
        numbers), so that the resumed run can save that step again."""
        aside = self.directory / f"{step}.damaged"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self._manager.reload()
        return aside

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """The shapes of the state saved at `step` from its metadata, or None if the metadata is unreadable."""
        try:
            return _shapes(self._manager.item_metadata(step)[STATE])
        except Exception:  # unreadable metadata is damage, whatever the reader raises
            return None

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
