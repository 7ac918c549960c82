"""Where a step's time goes: a `jax.profiler` trace of the compiled step, op time by category.

Used by `python experiments/bench.py method=profile` (see bench.py) and by
`python experiments/profile_step.py` (the per-model table of issue 15).

The step (one image, forward and backward to the layer, the optimizer update) is
compiled on its own, as fvis' host loop runs it, and called under the profiler.
Each XLA op event of the trace (one event per op, lasting as long as the op, its
own worker threads included: the ops of a step run one after another, so their sum
is the step's busy time and the rest of its wall time passes between ops) is
matched to its HLO instruction in the compiled module, whose metadata names the JAX primitive, the Keras layer it came from and
whether it belongs to the backward pass (`transpose(...)` in its name stack). From
that the op is put in one category:

- convolution forward / convolution input gradient (the backward pass), each split by
  how XLA's CPU backend runs it: a library call (YNNPACK fusions, Eigen) or XLA's own
  emitted loops; stride-2 convolutions' input gradients are "dilated" convolutions;
- batch normalization, activations and adds (elementwise fusions), forward / backward;
- pooling (max pooling forward and backward);
- copies and transposes;
- the rest (the objective, the gradient normalisation, the optimizer update).
"""

import collections
import glob
import re
import tempfile
import time

import jax
import numpy as np
from jax.profiler import ProfileData

import bench_measure
import fvis

CONVOLUTION_KINDS = ("ynn_fusion", "convolution", "dot", "custom-call")


def instruction_origins(hlo_text):
    """{HLO instruction name: its metadata op_name} of a compiled module's text."""
    pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', re.M)
    return dict(pattern.findall(hlo_text))


def layer_kinds(model):
    """{layer name: Keras class name} of a Keras model (nested models included)."""
    model = getattr(model, "model", model)  # a fvis KerasModel wraps the keras.Model
    out = {}
    for layer in model.layers:
        out[layer.name] = type(layer).__name__
        if hasattr(layer, "layers"):
            out.update(layer_kinds(layer))
    return out


def category(name, op_name, kinds):
    """The cost category of the op event `name` whose HLO metadata is `op_name`."""
    backward = "transpose(" in op_name
    direction = "input gradient" if backward else "forward"
    layer = next((part for part in op_name.split("/") if part in kinds), None)
    kind = kinds.get(layer, "")
    if name.startswith(("copy", "transpose")):
        return "copies, transposes"
    if "Pooling" in kind or any(k in name for k in ("reduce-window", "select-and-scatter", "scatter")):
        return "pooling (forward and backward)"
    if name.startswith(CONVOLUTION_KINDS) and ("Conv" in kind or "conv_general" in op_name or "dot_general" in op_name):
        if name.startswith("convolution-base-dilated"):
            engine = "dilated: stride-2 gradient"
        elif name.startswith("ynn_fusion"):
            engine = "YNNPACK"
        elif name.startswith("convolution"):
            engine = "Eigen" if not name.startswith("conv_general_dilated") else "XLA loops"
        else:
            engine = name.split(".")[0]
        return f"convolution {direction} ({engine})"
    if name.startswith("conv_general_dilated"):
        return f"convolution {direction} (XLA loops)"
    if "BatchNormalization" in kind:
        return f"batch normalization {'backward' if backward else 'forward'}"
    if kind in ("ReLU", "Activation", "Add") or kind.startswith(("ZeroPadding", "ReLU")):
        return f"activations, adds, pads {'backward' if backward else 'forward'}"
    if kind:
        return f"other layers ({kind})"
    return "objective, normalisation, update"


def op_times(folder, origins, kinds):
    """{category: op-seconds} and {op name: op-seconds} from the trace in `folder`."""
    data = ProfileData.from_file(sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True))[-1])
    by_category, by_name = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "while", "SlinkyThreadPool")):
                    continue  # containers and waits, not ops
                seconds = event.duration_ns / 1e9
                by_category[category(event.name, origins.get(event.name, ""), kinds)] += seconds
                by_name[event.name] += seconds
    return by_category, by_name


def profile_step(job, keras_model, *, calls=5):
    """Traces `calls` steps of `job` (after a warm-up) and returns op time per image-step by category.

    Returns:
        dict with "wall_per_step_s" (median of the traced calls), "op_s_per_step" {category: seconds},
        "step_flops" (XLA's count), "top_ops" [[name, op_name, seconds]] (the 15 largest).
    """
    step, weights, state, units = bench_measure.compiled_step(job)
    origins = instruction_origins(step.as_text())
    kinds = layer_kinds(keras_model)
    holder = [state]

    def call():
        holder[0], aux = step(weights, holder[0], units, np.int32(0))
        return jax.block_until_ready(aux)

    call()
    call()
    folder = tempfile.mkdtemp(prefix="fvis_trace_")
    walls = []
    jax.profiler.start_trace(folder)
    for _ in range(calls):
        start = time.perf_counter()
        call()
        walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    by_category, by_name = op_times(folder, origins, kinds)
    return {"wall_per_step_s": float(np.median(walls)), "calls": calls, "step_flops": bench_measure.flops_of(step),
            "op_s_per_step": {k: v / calls for k, v in by_category.most_common()},
            "top_ops": [[k, origins.get(k, ""), v / calls] for k, v in by_name.most_common(15)]}


def measure_profile(model, job_cfg, *, batch_size, loops, cpu_ops):
    """`bench.py method=profile`: the step of `job_cfg` profiled per `cpu_ops` setting (loops: ignored,
    the step is profiled alone as the host loop runs it; a scan chunk's ops appear inside its while loop)."""
    from fvis import devices
    out = []
    for setting in cpu_ops:
        devices.AUTO[jax.default_backend()]["cpu_ops"] = setting
        job = fvis.prepare(model, job_cfg.layer, f"0:{batch_size}", steps=job_cfg.steps, batch_size=1, loop="host")
        out.append({"cpu_ops": setting, **profile_step(job, model)})
    return out
