"""Units sharded over several devices, or hosts, give the single-device images (simulated CPU devices)."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from tests.conftest import cpu_devices_env

SCRIPT = textwrap.dedent("""
    import json
    import fvis, jax, numpy as np
    model = fvis.models.tiny_convnet(image_size=(24, 24), width=8)
    out = {"devices": jax.device_count()}
    for loop in ("scan", "host"):
        one = fvis.visualize(model, "conv3", "0:10", steps=3, batch_size=4, loop=loop, devices=jax.devices()[:1],
                             progress=False)
        job = fvis.prepare(model, "conv3", "0:10", steps=3, batch_size=3, loop=loop)
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
    env = cpu_devices_env(4, JAX_PLATFORMS="cpu")
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


MULTI_HOST = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2,
                               process_id=int(sys.argv[1]))
    import fvis
    model = fvis.models.tiny_convnet(image_size=(24, 24), width=8)
    result = fvis.visualize(model, "conv3", "0:6", steps=3, batch_size=4, progress=False)
    print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(),
                      "images": result.images.tolist(), "final": result.final.tolist()}))
""")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_equal_one_process(tmp_path):
    import fvis
    env = cpu_devices_env(2, JAX_PLATFORMS="cpu")
    port, logs = str(_free_port()), [tmp_path / f"process_{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_HOST, str(i), port], env=env, stdout=open(logs[i], "w"),
                              stderr=subprocess.STDOUT) for i in range(2)]  # files: a full pipe would deadlock
    for p in procs:
        p.wait(timeout=300)
    assert all(p.returncode == 0 for p in procs), logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
    runs = [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]
    model = fvis.models.tiny_convnet(image_size=(24, 24), width=8)
    alone = fvis.visualize(model, "conv3", "0:6", steps=3, batch_size=4, progress=False)
    for run in runs:  # every host holds the whole result, equal to one process on one device
        assert run["devices"] == 4 and run["local"] == 2
        np.testing.assert_allclose(run["images"], alone.images, atol=1e-5)
        np.testing.assert_allclose(run["final"], alone.final, rtol=1e-4, atol=1e-5)
