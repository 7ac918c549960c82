"""Does the diversity term give different images of one unit on a real network?

    python experiments/quality_diversity.py

EfficientNet-Lite0 (block4c_add), units 0 and 7, 4 images each, the lucid recipe at
128x128 for 256 steps, with diversity weights 0, 10 and 100 (see conf/objective/diversity.yaml).
Prints the mean pairwise cosine similarity of the images' Gram matrices and each
image's activation; writes the grids to experiments/runs/quality_diversity/ and the
figures to experiments/results/quality_diversity.json.
"""

import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

import fvis
from fvis import objectives as O, params, transforms

ROOT = Path(__file__).resolve().parents[1]
LAYER, UNITS, D, STEPS, SIZE = "block4c_add", [0, 7], 4, 256, (128, 128)
WEIGHTS = (0.0, 10.0, 100.0)


def gram_similarity(acts):
    """Mean cosine similarity of the Gram matrices of D activations (D, h, w, c), over pairs."""
    flat = acts.reshape(len(acts), -1, acts.shape[-1])
    grams = np.einsum("dpi,dpj->dij", flat, flat).reshape(len(acts), -1)
    grams /= np.linalg.norm(grams, axis=1, keepdims=True)
    sim = grams @ grams.T
    return float((sim.sum() - np.trace(sim)) / (len(acts) * (len(acts) - 1)))


def main():
    model = fvis.models.efficientnet_lite0(image_size=SIZE)
    forward = fvis.prepare(model, LAYER, [0]).forward
    acts_of = jax.jit(jax.vmap(lambda x: forward(forward.weights(), x)[LAYER]))
    out, rows = ROOT / "experiments" / "runs" / "quality_diversity", []
    out.mkdir(parents=True, exist_ok=True)
    for weight in WEIGHTS:
        objective = O.channel(LAYER) + weight * O.diversity(LAYER) if weight else O.channel(LAYER)
        start = time.perf_counter()
        result = fvis.visualize(model, objective, UNITS, images_per_unit=D, param=params.fourier(),
                                transform=transforms.standard(), optimizer=optax.adam(0.05), steps=STEPS,
                                progress=False)
        seconds = time.perf_counter() - start
        channel_values = fvis.quality.unit_values(forward, O.channel(LAYER), result.images.reshape(-1, *SIZE, 3),
                                                  UNITS)
        for i, unit in enumerate(UNITS):
            rows.append({"weight": weight, "unit": unit, "gram_similarity": gram_similarity(np.asarray(
                acts_of(result.images[i]))), "channel_activation": channel_values[i * D: (i + 1) * D, i].tolist(),
                "seconds": seconds})
            print(rows[-1], flush=True)
        tiles = fvis.outputs.tiles(result, crop=8, mode="clip")
        fvis.images.save_png(out / f"weight_{weight:g}.png", fvis.images.grid(tiles, cols=D))
    path = ROOT / "experiments" / "results" / "quality_diversity.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
