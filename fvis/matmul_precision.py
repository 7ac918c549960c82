"""The precision of float32 matrix products and convolutions: chosen per job, recorded as it ran.

Accelerators compute float32 dots and convolutions at reduced precision unless told
otherwise: a TPU in one bfloat16 pass, an Ampere-or-later NVIDIA GPU in TensorFloat-32
(10 mantissa bits); a CPU computes them in float32 whatever is asked. JAX chooses with
`jax_default_matmul_precision` (levels "default", "high", "highest"; see
`jax.lax.Precision`). A job's `matmul_precision` setting picks the level, applied with
`jax.default_matmul_precision` around the job's tracing, so it binds the compiled
program and leaves JAX's global setting as it was:

    fvis.visualize(model, "conv3_block4_out", "0:8", matmul_precision="highest")

    setting        level      CPU       GPU (Ampere+)    TPU
    auto           JAX's own setting (jax_default_matmul_precision; unset: default)
    default        default    float32   tensorfloat32    bfloat16 (1 pass)
    high           high       float32   tensorfloat32    bfloat16_3x (3 passes)
    highest        highest    float32   float32          bfloat16_6x (6 passes, ~float32)

JAX's aliases are accepted too: "bfloat16" = default, "tensorfloat32" = high,
"float32" = highest (named after what they do on a TPU). This is not the job's
`precision` setting (float32 | bfloat16: the dtype the model's layers compute in,
mixed precision): `matmul_precision` says how float32 operands are multiplied; under
`precision="bfloat16"` the layers' operands are bfloat16 already.

`describe` gives the record results.json keeps; `in_program` counts the precision each
dot and convolution of a lowered program carries, so the record can be checked
against what was compiled.
"""

import collections
import os
import re

import jax

from fvis.errors import InvalidValueError

LEVELS = ("default", "high", "highest")
ALIASES = {"bfloat16": "default", "tensorfloat32": "high", "float32": "highest"}  # JAX's names
MATMUL_PRECISIONS = ("auto", *LEVELS, *ALIASES)

# What float32 operands become at each level, per backend (jax.lax.Precision's documentation).
_EFFECTIVE = {
    "cpu": {"default": "float32", "high": "float32", "highest": "float32"},
    "gpu": {"default": "tensorfloat32", "high": "tensorfloat32", "highest": "float32"},
    "tpu": {"default": "bfloat16", "high": "bfloat16_3x", "highest": "bfloat16_6x"},
}


def check_matmul_precision(setting):
    """Returns `setting` if it is one of `MATMUL_PRECISIONS`, else raises InvalidValueError."""
    if not isinstance(setting, str) or setting not in MATMUL_PRECISIONS:
        raise InvalidValueError(
            f"Unknown matmul_precision {setting!r}: use auto (JAX's own setting), default, high or highest "
            f"(jax.lax.Precision levels), or JAX's aliases bfloat16 (= default), tensorfloat32 (= high), float32 "
            f"(= highest). It sets how float32 matmuls and convolutions are computed; the layers' dtype is "
            f"`precision` (float32|bfloat16). Received: matmul_precision={setting!r}")
    return setting


def level(setting):
    """The `jax_default_matmul_precision` value a job runs under: "default", "high" or "highest";
    for "auto", JAX's current setting (None counts as "default"; a dot algorithm name as it is)."""
    check_matmul_precision(setting)
    if setting == "auto":
        configured = jax.config.jax_default_matmul_precision
        return "default" if configured is None else ALIASES.get(configured, configured)
    return ALIASES.get(setting, setting)


def effective(level_, platform=None, device=None):
    """What float32 operands of a dot or convolution are computed in at `level_` on `platform`
    (default JAX's backend): "float32", "tensorfloat32", "bfloat16", "bfloat16_3x", "bfloat16_6x",
    or "unknown". A GPU without TensorFloat-32 (compute capability below 8.0, or
    NVIDIA_TF32_OVERRIDE=0) computes in float32."""
    platform = platform or jax.default_backend()
    if level_ not in LEVELS:  # a dot algorithm (e.g. "BF16_BF16_F32"): dots as named, convolutions at default
        return f"{level_} (dots); {effective('default', platform, device)} (convolutions)"
    table = _EFFECTIVE.get(platform)
    if table is None:
        return "unknown"
    if platform == "gpu" and table[level_] == "tensorfloat32" and not _has_tf32(device):
        return "float32"
    return table[level_]


def _has_tf32(device=None):
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return False
    device = device or jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    try:
        return capability is None or float(capability) >= 8.0  # unknown: XLA's default (TF32 where it exists)
    except (TypeError, ValueError):
        return True


def describe(setting, platform=None, device=None):
    """The record of what a job's float32 matmuls and convolutions run in, for results.json:
    {"setting": as given, "level": the JAX level in force, "backend": "cpu"|"gpu"|"tpu",
    "effective": what float32 operands are computed in (see `effective`)}."""
    platform = platform or jax.default_backend()
    in_force = level(setting)
    return {"setting": setting, "level": in_force, "backend": platform,
            "effective": effective(in_force, platform, device)}


_OP = re.compile(r"stablehlo\.(convolution|dot_general)\b")
_PRECISION = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")
_ALGORITHM = re.compile(r"algorithm = <([^>]*)>")
_OPERAND_TYPE = re.compile(r"tensor<(?:[0-9?]+x)*([a-z][a-z0-9]*)>")


def in_program(texts):
    """Counts the dots and convolutions of lowered programs by operand dtype and precision.

    Args:
        texts: StableHLO module texts (`jax.jit(f).lower(...).as_text()`).

    Returns:
        {"convolution": {"f32 HIGHEST": n, ...}, "dot_general": {...}}: each op's first
        operand's element type and its precision per operand (one name when both agree;
        "DEFAULT" where none is given); a dot with an algorithm shows it after the precision.
    """
    counts = collections.defaultdict(collections.Counter)
    for text in texts:
        for line in text.splitlines():
            op = _OP.search(line)
            if op is None:
                continue
            found = _PRECISION.search(line)
            names = re.findall(r"[A-Z]+", found.group(1)) if found else []
            precision = ",".join(dict.fromkeys(names)) or "DEFAULT"
            algorithm = _ALGORITHM.search(line)
            if algorithm:
                precision += f" algorithm({algorithm.group(1)})"
            operand = _OPERAND_TYPE.search(line, op.end())  # operands are SSA names: the first type is the lhs'
            counts[op.group(1)][f"{operand.group(1) if operand else '?'} {precision}"] += 1
    return {op: dict(sorted(counter.items())) for op, counter in sorted(counts.items())}
