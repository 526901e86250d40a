"""Multi-host start-up: wire ``jax.distributed.initialize`` to flags and the environment.

Every process of a multi-host job (a TPU pod slice, a SLURM or Open MPI job, several GPU hosts) must call
:func:`maybe_initialize_distributed` before anything touches a jax backend; the CLI does this first. After
it, ``jax.devices()`` lists the devices of every host, a mesh from `ov_jax.sharding.make_mesh` spans them,
and each host feeds only its local devices (`ov_jax.sharding.put_global`).

Resolution order: explicit arguments, then ``OV_JAX_COORDINATOR`` / ``OV_JAX_NUM_PROCESSES`` /
``OV_JAX_PROCESS_ID`` (or jax's own ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``),
then cluster auto-detection (jax reads SLURM, Open MPI, Cloud TPU and GKE metadata itself) when the
environment shows several processes or ``OV_JAX_DISTRIBUTED=auto`` asks for it. A single process with
nothing set stays single-process: nothing is initialised.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_COORDINATOR = ("OV_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("OV_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("OV_JAX_PROCESS_ID", "JAX_PROCESS_ID")
ENV_MODE = "OV_JAX_DISTRIBUTED"  # "auto": let jax detect the cluster; "0" / "off": never initialise


class DistributedConfigError(ValueError):
    """Multi-host settings that are incomplete or contradictory."""


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if env.get(name, "").strip():
            return env[name].strip()
    return None


def _as_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{what} must be an integer, got {value!r}") from None


def _cluster_has_several_processes(env: Mapping[str, str]) -> str | None:
    """Name of the launcher when the environment shows a multi-process job that jax can auto-detect."""
    if "SLURM_JOB_ID" in env and _as_int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and _as_int(env.get("OMPI_COMM_WORLD_SIZE", "1"), "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU (multi-host)"
    return None


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, *, environ: Mapping[str, str] | None = None
                                 ) -> bool:
    """Start jax's multi-controller runtime if this process is one of several; True when it is running.

    ``coordinator`` is ``host:port`` of process 0. Give all three values (flags or environment) to start
    explicitly, or none to auto-detect. Safe to call twice. Call it before any other jax call.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    coordinator = coordinator or _first(env, ENV_COORDINATOR)
    num_processes = _as_int(num_processes if num_processes is not None else _first(env, ENV_NUM_PROCESSES),
                            "num_processes")
    process_id = _as_int(process_id if process_id is not None else _first(env, ENV_PROCESS_ID), "process_id")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise DistributedConfigError(
                f"multi-host start needs coordinator, num_processes and process_id together; missing {missing} "
                f"(flags, or env {ENV_COORDINATOR[0]} / {ENV_NUM_PROCESSES[0]} / {ENV_PROCESS_ID[0]}); give none "
                "of them to let jax detect a SLURM / Open MPI / Cloud TPU cluster")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedConfigError(f"process_id {process_id} is not in [0, num_processes={num_processes})")
        if num_processes == 1:
            return False
        log.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", coordinator, num_processes,
                 process_id)
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    launcher = _cluster_has_several_processes(env)
    if launcher or mode == "auto":
        log.info("jax.distributed.initialize() with cluster auto-detection (%s)", launcher or ENV_MODE + "=auto")
        jax.distributed.initialize()
        return True
    return False


def add_arguments(parser: Any) -> None:
    """The multi-host flags (``--coordinator``, ``--num-processes``, ``--process-id``) on an argparse parser;
    pass their values to :func:`maybe_initialize_distributed`."""
    parser.add_argument("--coordinator", help="multi-host: host:port of process 0 (or OV_JAX_COORDINATOR)")
    parser.add_argument("--num-processes", type=int, help="multi-host: process count (or OV_JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-host: this process (or OV_JAX_PROCESS_ID)")


def is_writer() -> bool:
    """Process 0 owns shared side effects (output files, logs) in a multi-host job."""
    return jax.process_index() == 0


def broadcast_from_writer(value: np.ndarray) -> np.ndarray:
    """Process 0's ``value`` on every process (identity in a single-process job)."""
    if jax.process_count() == 1:
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def sync(name: str) -> None:
    """Barrier across processes (no-op in a single-process job)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
