import os
from pathlib import Path

import pytest

import fvis  # noqa: F401  (selects Keras' JAX backend before any test module imports keras)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Model conversions go to a per-session cache, never the user's."""
    os.environ.setdefault("FVIS_CACHE_DIR", str(tmp_path_factory.mktemp("fvis_cache")))


def shared_path(*parts):
    """A path under ../shared, or skip the test where that folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not part of every checkout)")
    return path


@pytest.fixture(scope="session")
def tiny():
    import fvis  # noqa: F401  (sets the JAX backend)
    from fvis import models
    return models.tiny_convnet(image_size=(32, 32))


@pytest.fixture
def step_traces(monkeypatch):
    """A list that grows by one each time a job's optimisation step is traced (compiled)."""
    import importlib

    visualize = importlib.import_module("fvis.visualize")  # the module; fvis.visualize is the function
    traces, real = [], visualize.make_renderer

    def counted(*args, **kwargs):
        renderer = real(*args, **kwargs)

        def step(*step_args):
            traces.append(1)
            return renderer.step(*step_args)

        return renderer._replace(step=step)

    monkeypatch.setattr(visualize, "make_renderer", counted)
    return traces
