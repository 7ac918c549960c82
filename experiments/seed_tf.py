"""Baseline (b): the seed's TensorFlow code, as it gives it (../shared/seed), timed.

    KERAS_BACKEND=tensorflow python experiments/seed_tf.py '{"model": "ResNet50V2",
        "layer": "conv3_block4_out", "filters": 64, "image_size": [180, 180], "steps": 30}'

Run by `experiments/bench.py method=tf_seed` in its own process (Keras' backend is
fixed at import). The code is the seed's: a `tf.function` gradient-ascent step
on one image, a Python loop over steps and over filters, its deprocess and
its grid (kept in memory, not saved). Only the weights differ: random (weights=None),
which cost the same FLOPs as ImageNet's and need no download. Prints one JSON line.

With `"record": FOLDER` in the job (experiments/seed_vs_fvis.py), the random state is
seeded and the model's weights, each filter's start image, its loss at every step and
its final image (before the deprocess) are saved there, for fvis to rerun the same job.
"""

import json
import os
import resource
import sys
import time

START, CPU0 = time.perf_counter(), time.process_time()
os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

job = json.loads(sys.argv[1])
img_height, img_width = job["image_size"]
imported = time.perf_counter()
record = job.get("record")
if record:
    keras.utils.set_random_seed(job.get("seed", 0))
model = getattr(keras.applications, job["model"])(weights=None, include_top=False)
layer = model.get_layer(name=job["layer"])
feature_extractor = keras.Model(inputs=model.inputs, outputs=layer.output)
built = time.perf_counter()


def compute_loss(input_image, filter_index):
    activation = feature_extractor(input_image)
    filter_activation = activation[:, 2:-2, 2:-2, filter_index]
    return tf.reduce_mean(filter_activation)


@tf.function
def gradient_ascent_step(img, filter_index, learning_rate):
    with tf.GradientTape() as tape:
        tape.watch(img)
        loss = compute_loss(img, filter_index)
    grads = tape.gradient(loss, img)
    grads = tf.math.l2_normalize(grads)
    img += learning_rate * grads
    return loss, img


def initialize_image():
    img = tf.random.uniform((1, img_height, img_width, 3))  # the seed writes (1, width, height, 3)
    return (img - 0.5) * 0.25


step_times = []


recorded = {"starts": [], "losses": [], "finals": []}


def visualize_filter(filter_index):
    iterations = job["steps"]
    learning_rate = 10.0
    img = initialize_image()
    recorded["starts"].append(img[0].numpy())
    recorded["losses"].append([])
    for iteration in range(iterations):
        t = time.perf_counter()
        loss, img = gradient_ascent_step(img, filter_index, learning_rate)
        recorded["losses"][-1].append(float(loss.numpy()))  # waits for the step, so it can be timed
        step_times.append(time.perf_counter() - t)
    recorded["finals"].append(img[0].numpy())
    img = deprocess_image(img[0].numpy())
    return loss, img


def deprocess_image(img):
    img -= img.mean()
    img /= img.std() + 1e-5
    img *= 0.15
    img = img[25:-25, 25:-25, :]
    img += 0.5
    img = np.clip(img, 0, 1)
    img *= 255
    img = np.clip(img, 0, 255).astype("uint8")
    return img


all_imgs = []
for filter_index in range(job["filters"]):
    loss, img = visualize_filter(filter_index)
    all_imgs.append(img)

margin = 5
n = int(np.ceil(np.sqrt(len(all_imgs))))
cropped_width, cropped_height = img_width - 25 * 2, img_height - 25 * 2
stitched_filters = np.zeros((n * cropped_height + (n - 1) * margin, n * cropped_width + (n - 1) * margin, 3))
for index, img in enumerate(all_imgs):
    i, j = divmod(index, n)
    stitched_filters[(cropped_height + margin) * i: (cropped_height + margin) * i + cropped_height,
                     (cropped_width + margin) * j: (cropped_width + margin) * j + cropped_width, :] = img

end = time.perf_counter()
if record:
    model.save_weights(os.path.join(record, "weights.weights.h5"))
    np.savez(os.path.join(record, "seed_tf.npz"), **{k: np.asarray(v, np.float32) for k, v in recorded.items()})
print(json.dumps({
    "tensorflow": tf.__version__, "keras": keras.__version__, "import_s": imported - START,
    "build_model_s": built - imported, "first_step_s": step_times[0], "step_s": float(np.median(step_times[1:])),
    # tf.function retraces for each new Python int filter_index: each filter's first step traces
    "first_step_per_filter_s_mean": float(np.mean(step_times[:: job["steps"]])),
    "step_s_min": float(min(step_times[1:])), "job_s": end - imported, "job_cpu_s": time.process_time() - CPU0,
    "image_steps": job["filters"] * job["steps"], "job_image_steps_per_s": job["filters"] * job["steps"] / (end - imported),
    "host_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_images": 1}))
