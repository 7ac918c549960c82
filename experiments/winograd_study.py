"""Where Winograd's F(2x2, 3x3) pays on this CPU (issue 15; `fvis.models.winograd.worthwhile`).

    python experiments/winograd_study.py shapes        # one convolution per shape, alone and two in flight
    python experiments/winograd_study.py step          # the ResNet50V2 step (180x180), alone and two in flight
    python experiments/winograd_study.py step 224
    python experiments/winograd_study.py scale         # Job.run at the scale job's shape, three gates

Each prints its table to stdout (the figures in experiments/results/README.md, "Winograd", were
printed by these parts, run one after another on a quiet machine). Variants alternate within a round.
"""

import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fvis  # noqa: E402
from fvis import devices  # noqa: E402
from fvis.models import winograd  # noqa: E402

SAME = ((1, 1), (1, 1))
SHAPES = [(90, 16, 16), (45, 64, 64), (23, 128, 128), (14, 256, 256), (12, 256, 256), (7, 512, 512), (56, 64, 64),
          (28, 128, 128), (112, 64, 64), (180, 3, 16), (45, 64, 192), (23, 96, 128)]


def _library(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), SAME, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _winograd(x, w):
    return winograd.conv3x3(x, w, SAME)


def _forward_and_input_gradient(conv):
    @jax.jit
    def f(x, w, g):
        y, vjp = jax.vjp(lambda x: conv(x, w), x)
        return y, vjp(g)[0]
    return f


def _alone(fn, *args, n=40):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return np.median(times) * 1e3


def _in_flight(fn, *args, n=40):
    """ms per call with two threads calling `fn` at once."""
    jax.block_until_ready(fn(*args))

    def work():
        for _ in range(n):
            jax.block_until_ready(fn(*args))
    threads = [threading.Thread(target=work) for _ in range(2)]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return (time.perf_counter() - start) / (2 * n) * 1e3


def shapes():
    for timer, label in ((_alone, "alone"), (_in_flight, "in flight")):
        for hw, c_in, c_out in SHAPES:
            x, w, g = jnp.ones((1, hw, hw, c_in)), jnp.ones((3, 3, c_in, c_out)) * 0.01, jnp.ones((1, hw, hw, c_out))
            a, b = _forward_and_input_gradient(_library), _forward_and_input_gradient(_winograd)
            r = [(timer(a, x, w, g), timer(b, x, w, g)) for _ in range(2)]
            print(f"{hw} {c_in} {c_out} {label}: library {r[0][0]:.3f} winograd {r[0][1]:.3f} | {r[1][0]:.3f} "
                  f"{r[1][1]:.3f}  ratio {(r[0][0] + r[1][0]) / (r[0][1] + r[1][1]):.2f}", flush=True)


def _up_to(pixels):
    """Winograd on every map of 16..`pixels` px (32-128 channels, C_in * C_out <= 128^2), whatever its channels:
    the rule of 2026-11-30 with `pixels` = 48."""
    return lambda x, k: (16 <= x[1] <= pixels and 16 <= x[2] <= pixels and min(x[3], k[-1]) >= 32
                         and x[3] * k[-1] <= 128 * 128)


def step(size=180):
    """The compiled ResNet50V2 step (conv3_block4_out, one image), alone and two in flight: the library,
    Winograd where `worthwhile` says, on every map of 16..48 px (the rule of 2026-11-30) and of 16..64 px
    (at 180 px all three Winograd gates take the same convolutions; at 224 px the 56x56 maps with 64
    channels and the 28x28 ones with 128 tell them apart)."""
    import bench_measure
    model = fvis.models.keras_application("ResNet50V2", weights=None, image_size=(size, size))
    gates = {"library": (False, winograd.worthwhile), "winograd": (True, winograd.worthwhile),
             "winograd, maps <= 48 px": (True, _up_to(48)), "winograd, maps <= 64 px": (True, _up_to(64))}
    rule, steps = winograd.worthwhile, {}
    try:
        for name, (on, gate) in gates.items():
            devices.AUTO["cpu"]["winograd"], winograd.worthwhile = on, gate
            job = fvis.prepare(model, "conv3_block4_out", "0:1", steps=2, batch_size=1, loop="host")
            steps[name] = list(bench_measure.compiled_step(job, states=3))
            print(name, "GFLOP (XLA's count):", bench_measure.flops_of(steps[name][0]) / 1e9)
    finally:
        winograd.worthwhile = rule

    def alone(step, weights, states, units, n=30):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            states[0], aux = step(weights, states[0], units, np.int32(0))
            jax.block_until_ready(aux)
            times.append(time.perf_counter() - start)
        return np.median(times) * 1e3

    def flight(step, weights, states, units, n=30):
        def work(i):
            for _ in range(n):
                states[i], aux = step(weights, states[i], units, np.int32(0))
                jax.block_until_ready(aux)
        threads = [threading.Thread(target=work, args=(i,)) for i in (1, 2)]
        start = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        return (time.perf_counter() - start) / (2 * n) * 1e3

    for r in range(6):
        print(f"round {r}: " + "  ".join(f"{k} alone {alone(*v):.1f} in flight {flight(*v):.1f}"
                                          for k, v in (steps.items() if r % 2 == 0 else reversed(steps.items()))),
              flush=True)


def scale(size=224, filters=40):
    """`Job.run` at the scale job's shape (2 steps, one filter per chunk): optimise ms per filter, three gates."""
    jax.config.update("jax_enable_compilation_cache", False)
    model = fvis.models.keras_application("ResNet50V2", weights=None, image_size=(size, size))
    gates = {"library": (False, winograd.worthwhile), "winograd, maps <= 64 px": (True, _up_to(64)),
             "winograd, maps <= 48 px": (True, _up_to(48)), "winograd, worthwhile": (True, winograd.worthwhile)}
    rule = winograd.worthwhile
    try:
        for r in range(3):
            out = []
            for name, (on, gate) in gates.items():
                devices.AUTO["cpu"]["winograd"], winograd.worthwhile = on, gate
                result = fvis.prepare(model, "conv3_block4_out", f"0:{filters}", steps=2).run(progress=False)
                out.append(f"{name}: {result.optimize_s / filters * 1e3:.1f} ms/filter, compile {result.compile_s:.2f} s")
            print(f"round {r}: " + " | ".join(out), flush=True)
    finally:
        winograd.worthwhile = rule


if __name__ == "__main__":
    part, *rest = sys.argv[1:] or ["step"]
    {"shapes": shapes, "step": step, "scale": scale}[part](*map(int, rest))
