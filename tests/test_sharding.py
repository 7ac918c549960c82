"""Units sharded over several devices give the single-device images (4 simulated CPU devices)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json
    import fvis, jax, numpy as np
    model = fvis.models.tiny_convnet(image_size=(24, 24), width=8)
    out = {"devices": jax.device_count()}
    for loop in ("scan", "host"):
        one = fvis.visualize(model, "conv3", "0:10", steps=3, batch_size=4, loop=loop, devices=jax.devices()[:1],
                             compilation_cache=False, progress=False)
        job = fvis.prepare(model, "conv3", "0:10", steps=3, batch_size=3, loop=loop, compilation_cache=False)
        many = job.run(progress=False)
        weights = job.placed_weights()
        chunk, _ = job.compile(weights)
        images = chunk(weights, job._placed(job.units[:3])).images
        out[loop] = {"batch_size": job.batch_size, "chunks": len(job.chunks()),
                     "max_diff": float(np.abs(many.images - one.images).max()),
                     "final_diff": float(np.abs(many.final - one.final).max()),
                     "image_devices": len(images.sharding.device_set),
                     "shard_rows": sorted({s.data.shape[0] for s in images.addressable_shards}),
                     "weights_replicated": all(w.sharding.is_fully_replicated for w in jax.tree.leaves(weights))}
    print(json.dumps(out))
""")


def test_units_sharded_over_four_devices_equal_the_single_device_run():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for loop in ("scan", "host"):
        r = out[loop]
        assert r["batch_size"] == 4 and r["chunks"] == 3  # 3 rounded up to the 4 devices; 10 units -> 3 chunks
        assert r["image_devices"] == 4 and r["shard_rows"] == [1]  # one unit per device
        assert r["weights_replicated"]
        np.testing.assert_array_less([r["max_diff"], r["final_diff"]], [1e-5, 1e-5])
