"""How much memory a chunk needs, how much the device has, and running out of it.

Before a job optimises anything, fvis compiles its chunk program and reads XLA's
memory analysis of it (`Compiled.memory_analysis()`): the bytes of the program's
arguments (weights, units), outputs (images, curves) and temporaries (activations
kept for the backward pass, optimiser state). That estimate is compared with what
the device has free (`budget`):

- GPU/TPU: the device's `memory_stats()` (bytes_limit - bytes_in_use);
- CPU: the least of the memory the system has available (MemAvailable, a cgroup's
  memory.max) and the process' address-space limit (`ulimit -v`, RLIMIT_AS) less
  the address space it already uses, divided by `ADDRESS_SPACE_FACTOR`.

A chunk that still runs out of memory (XLA's RESOURCE_EXHAUSTED) is retried at half
the batch size by `fvis.visualize.Job.run`.
"""

import dataclasses
import resource
from pathlib import Path

import jax

from fvis.errors import FvisError


# XLA's CPU runtime reserves more address space than it touches: running a chunk grew the
# process' VmPeak by 3.9-4.2x XLA's estimate (tiny convnet at 128x128: estimates of 0.20 and
# 0.80 GiB, VmPeak +0.84 and +3.24 GB), while its resident memory grew by about the estimate.
# So an address-space limit (ulimit -v) is compared with 4x the estimate, available RAM with 1x.
ADDRESS_SPACE_FACTOR = 4


class OutOfMemoryError(FvisError, MemoryError):
    """A chunk cannot fit in the memory the device has, even at the smallest batch size allowed."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """XLA's figures for one compiled chunk program, bytes per device.

    Attributes:
        arguments: the inputs (model weights, the chunk's unit indices, a carried state).
        outputs: the results (images, curves, final values, gradient norms).
        temporaries: everything the program allocates while it runs (activations,
            gradients, optimiser state).
        aliased: outputs written into donated inputs (counted once).
    """

    arguments: int
    outputs: int
    temporaries: int
    aliased: int = 0

    @property
    def total(self):
        """The bytes the program holds at once at most: arguments + outputs + temporaries - aliased."""
        return self.arguments + self.outputs + self.temporaries - self.aliased


def estimate(*programs):
    """The largest `Estimate` among compiled programs (`jax.stages.Compiled`), or None when
    the backend reports no memory analysis. A chunk run as several programs one after
    another (the "host" loop: init, step, finish) needs the most any of them needs."""
    found = []
    for program in programs:
        stats = program.memory_analysis()
        if stats is None:
            return None
        found.append(Estimate(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                              int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes)))
    return max(found, key=lambda e: e.total)


def budget(devices=None):
    """Bytes a chunk may use per device and what bounds them, or None when nothing is known.

    Args:
        devices: the job's devices (default `jax.local_devices()`); only this process'
            devices count. CPU devices share the host's memory, so it is divided among them.

    Returns:
        (bytes, a few words naming the limit: "the device's free memory", "available memory",
        "the cgroup memory limit", "ulimit -v"), or None.
    """
    local = [d for d in (devices if devices is not None else jax.local_devices())
             if d.process_index == jax.process_index()] or jax.local_devices()
    if local[0].platform != "cpu":
        free = [_device_free(d) for d in local]
        return None if None in free else (min(free), "the device's free memory")
    host = host_budget()
    return None if host is None else (host[0] // len(local), host[1])


def _device_free(device):
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def host_budget():
    """Bytes of XLA buffers this process can still allocate on the host, and what bounds them:
    the least of the system's available memory, a cgroup memory limit's headroom and the
    address-space limit's headroom over `ADDRESS_SPACE_FACTOR`; None if none of them is known
    (not Linux)."""
    address_space = _address_space_headroom()
    limits = {"available memory": _meminfo_available(), "the cgroup memory limit": _cgroup_headroom(),
              "ulimit -v, its headroom / 4": None if address_space is None else address_space // ADDRESS_SPACE_FACTOR}
    known = [(n, source) for source, n in limits.items() if n is not None]
    return min(known) if known else None


def _meminfo_available():
    return _status_kib(Path("/proc/meminfo"), "MemAvailable")


def _address_space_headroom():
    """RLIMIT_AS (soft) less the address space in use (VmSize), or None without a limit."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    used = _status_kib(Path("/proc/self/status"), "VmSize")
    return max(0, limit - (used or 0))


def _cgroup_headroom():
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - current)


def _status_kib(path, field):
    """A "Field:   123 kB" line of a /proc file, in bytes; None if absent."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_out_of_memory(exc):
    """Whether `exc` is XLA running out of memory (RESOURCE_EXHAUSTED / "Out of memory"), or
    Python's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def gib(n):
    """Bytes as a short string: "1.23 GiB", or "12.3 MiB" under a GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
