"""Several hosts (processes) working on one job: starting JAX's distributed runtime.

    # on each of N hosts (process_id 0 .. N-1), before anything else uses JAX:
    fvis.distributed.initialize(coordinator="host0:1234", num_processes=N, process_id=i)
    # or, inside a cluster JAX detects (SLURM, Open MPI, Cloud TPU): fvis.distributed.initialize(auto=True)

After it, `jax.devices()` lists every host's devices and a job's unit mesh spans them
all (see `fvis.devices`); every process runs the same job. Process 0 writes the run
folder (`is_writer`); the others compute their share and write nothing there.
"""

import jax

from fvis.errors import InvalidValueError, check_positive_int

KEYS = ("coordinator", "num_processes", "process_id", "auto")


def initialize(coordinator=None, num_processes=None, process_id=None, auto=False):
    """Starts JAX's distributed runtime for a multi-host job, once per process.

    Args:
        coordinator: "host:port" of process 0's coordination service; with it,
            `num_processes` and `process_id` are required.
        num_processes: how many processes (hosts) take part, >= 1.
        process_id: this process' index, 0 .. num_processes - 1.
        auto: True: let `jax.distributed.initialize()` read the cluster's environment
            (SLURM, Open MPI, Cloud TPU); the three values above stay unset.

    Returns:
        True when a distributed runtime was started (or already was), False when nothing
        was asked (every argument unset).

    Raises:
        InvalidValueError: an incomplete or inconsistent set of values.
    """
    given = {k: v for k, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                ("process_id", process_id)) if v is not None}
    if not isinstance(auto, bool):
        raise InvalidValueError(f"distributed.auto must be true or false. Received: distributed.auto={auto!r}")
    if auto and given:
        raise InvalidValueError(f"distributed.auto=true reads the cluster's environment; leave "
                                f"{', '.join('distributed.' + k for k in given)} unset. Received: {given}")
    if not auto and not given:
        return False
    if not auto:
        _check_explicit(coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    # CPU devices of different processes exchange arrays through Gloo (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True


def _check_explicit(coordinator, num_processes, process_id):
    missing = [k for k, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise InvalidValueError(f"A multi-host run needs distributed.coordinator=host:port, "
                                f"distributed.num_processes=N and distributed.process_id=i (0 .. N-1) on every "
                                f"host, or distributed.auto=true in a cluster JAX detects. Missing: "
                                f"{', '.join('distributed.' + k for k in missing)}")
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise InvalidValueError(f"distributed.coordinator must be host:port, e.g. host0:1234. "
                                f"Received: distributed.coordinator={coordinator!r}")
    n = check_positive_int("distributed.num_processes", num_processes)
    i = check_positive_int("distributed.process_id", process_id, minimum=0)
    if i >= n:
        raise InvalidValueError(f"distributed.process_id must be 0 .. {n - 1} for {n} processes. "
                                f"Received: distributed.process_id={i}")


def is_writer():
    """Whether this process writes the run folder: process 0 (every single-process run)."""
    return jax.process_index() == 0
