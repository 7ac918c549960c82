"""A job's plain settings, checked once: by `fvis.prepare` from Python, and by the `fvis`
command from its config before the model loads.

    settings = fvis.Settings(steps=30, seed=0)          # raises at once on a bad value
    job = fvis.prepare(model, "conv3_block4_out", "0:64", settings=settings)
"""

import dataclasses
from typing import Optional, Union

from fvis.chunks import check_loop
from fvis.errors import InvalidValueError, check_positive_int, is_integer
from fvis.images import DISPLAY_MODES
from fvis.matmul_precision import check_matmul_precision
from fvis.models.base import check_precision

MAX_SEED = 2**32 - 1  # JAX's keys keep 32 bits of the seed (without jax_enable_x64): larger seeds repeat


def check_seed(seed):
    """Returns int(seed) or raises InvalidValueError: seeds are integers in [0, MAX_SEED]."""
    if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidValueError(f"seed must be an integer from 0 to {MAX_SEED} (JAX keeps 32 bits of a seed). "
                                f"Received: seed={seed!r}")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a job optimises, apart from its components (parameterization, transform, optimizer).

    Attributes:
        steps: optimisation steps, >= 1 (the reference: 30).
        batch_size: units per compiled chunk, an int >= 1, or "auto" (the backend's
            measured best, see `fvis.devices.AUTO`); rounded up to a multiple of the
            device count.
        images_per_unit: D images per unit from different starts (for diversity), >= 1.
        seed: int in [0, 2**32 - 1]; unit u's random start depends on (seed, u) only.
        loop: "scan" (all steps in one compiled call), "host" (a compiled step called
            from Python), or "auto" (the backend's measured best for this kind of model,
            see `fvis.devices.auto_loop`).
        workers: chunks optimised at the same time, each called from its own thread, an
            int >= 1, or "auto" (the backend's measured best, `fvis.devices.AUTO`: 2 on a
            CPU, where one small image's step leaves cores idle between its ops; 1 on an
            accelerator). The images do not depend on it.
        precision: "float32", or "bfloat16" (model layers compute in bfloat16; image,
            objective and gradient stay float32; see `fvis.models.Rewrites`): the dtype
            the layers compute in.
        matmul_precision: how float32 matmuls and convolutions are computed: "auto"
            (JAX's own `jax_default_matmul_precision`; unset: the backend's default),
            "default", "high" or "highest" (`jax.lax.Precision`), or JAX's aliases
            "bfloat16", "tensorfloat32", "float32". On a CPU every level computes in
            float32; on an Ampere+ GPU default and high use TensorFloat-32; on a TPU
            default is one bfloat16 pass. What ran is recorded in results.json (see
            `fvis.matmul_precision`).
        redirect_relu: the model's ReLUs pass gradient towards firing where they would
            pass none, so units dead on the start image still move (Lucid's redirected
            ReLU; same forward values; see `fvis.models.jax_rewrites`). Off in the
            reference, on in the lucid and maco presets.
        snapshots: step counts n in [0, steps] after which the image is kept (0: the start),
            like Lucid's `thresholds`; stored sorted, as a tuple. None or () keeps none.

    Raises:
        InvalidValueError, UnknownNameError: on construction, naming the bad value.
    """

    steps: int = 30
    batch_size: Union[int, str] = "auto"
    images_per_unit: int = 1
    seed: int = 0
    loop: str = "auto"
    workers: Union[int, str] = "auto"
    precision: str = "float32"
    matmul_precision: str = "auto"
    redirect_relu: bool = False
    snapshots: Optional[tuple] = ()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("steps", check_positive_int("steps", self.steps))
        set_("images_per_unit", check_positive_int("images_per_unit", self.images_per_unit))
        set_("seed", check_seed(self.seed))
        if self.batch_size != "auto":
            set_("batch_size", check_positive_int("batch_size", self.batch_size))
        if self.loop != "auto":
            check_loop(self.loop)
        if self.workers != "auto":
            if not is_integer(self.workers) or self.workers < 1:
                raise InvalidValueError(f"workers must be an integer >= 1 (chunks optimised at once) or \"auto\". "
                                        f"Received: workers={self.workers!r}")
            set_("workers", int(self.workers))
        check_precision(self.precision)
        check_matmul_precision(self.matmul_precision)
        if not isinstance(self.redirect_relu, bool):
            raise InvalidValueError(f"redirect_relu must be true or false. Received: redirect_relu={self.redirect_relu!r}")
        set_("snapshots", check_snapshots(self.snapshots, self.steps))


def check_snapshots(snapshots, steps):
    """Returns the snapshot steps as a sorted tuple of distinct ints in [0, steps], or raises InvalidValueError."""
    values = [] if snapshots is None else snapshots
    try:
        values = [v for v in values]
    except TypeError:
        values = None
    if values is None or not all(is_integer(v) and 0 <= v <= steps for v in values):
        raise InvalidValueError(f"snapshots must be a list of step counts from 0 (the start) to steps={steps}, "
                                f"e.g. [0, {steps // 2}, {steps}]. Received: snapshots={snapshots!r}")
    return tuple(sorted({int(v) for v in values}))


@dataclasses.dataclass(frozen=True)
class Display:
    """How images become tiles: see `fvis.images.deprocess` and `fvis.images.grid`.

    Attributes:
        mode: "seed" (the reference's contrast stretch) or "clip" ([-1, 1] -> [0, 1]).
        crop: pixels cut from each side of a tile, >= 0 (checked against the image size
            before a job computes).
        margin: black pixels between tiles, >= 0.
        transparency: also write each tile with MaCo's transparency map as its alpha channel
            (filters/filter_NNNN_alpha.png; Fel et al. 2023), shown in report.html.
    """

    mode: str = "seed"
    crop: int = 25
    margin: int = 5
    transparency: bool = False

    def __post_init__(self):
        check_positive_int("display.crop", self.crop, minimum=0)
        check_positive_int("display.margin", self.margin, minimum=0)
        if self.mode not in DISPLAY_MODES:
            raise InvalidValueError(f"Unknown display mode '{self.mode}'; use 'seed' or 'clip' (display.mode). "
                                    f"Received: mode='{self.mode}'")
        if not isinstance(self.transparency, bool):
            raise InvalidValueError(f"display.transparency must be true or false. Received: {self.transparency!r}")


@dataclasses.dataclass(frozen=True)
class Quality:
    """The quality report of a run (see `fvis.quality.measure`).

    Attributes:
        enabled: measure and write report.html.
        natural_images: a folder of photos to compare against, or None.
        draws: random jitter/rescale draws for robustness, >= 1.
    """

    enabled: bool = True
    natural_images: Optional[str] = None
    draws: int = 8

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise InvalidValueError(f"quality.enabled must be true or false. Received: {self.enabled!r}")
        if self.enabled:
            check_positive_int("quality.draws", self.draws)
