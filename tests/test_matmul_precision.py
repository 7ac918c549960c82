"""matmul_precision: the level binds the compiled programs, results.json records the one that ran,
bad values are refused before any compute."""

import json
import re
import types

import jax
import pytest

import fvis
from fvis import chunks, matmul_precision
from fvis.errors import FvisError, InvalidValueError
from tests.test_cli import composed

FAST = dict(steps=2, quality=fvis.Quality(enabled=False), display=fvis.Display(crop=2), progress=False)


@pytest.fixture
def compiled_programs(monkeypatch):
    """A list that receives the optimised HLO text (XLA's, after compilation) of every program a job compiles."""
    texts, real = [], chunks.lower_chunk

    class Spied:
        def __init__(self, lowered):
            self.lowered = lowered

        def as_text(self):
            return self.lowered.as_text()

        def compile(self):
            compiled = self.lowered.compile()
            texts.append(compiled.as_text())
            return compiled

    def spied(*args, each=None, **kwargs):  # programs compile as `each` receives them, or from the dict returned
        hand_on = None if each is None else (lambda name, program: each(name, Spied(program)))
        lowered, seed = real(*args, each=hand_on, **kwargs)
        return {name: Spied(program) for name, program in lowered.items()}, seed

    monkeypatch.setattr(chunks, "lower_chunk", spied)
    return texts


def convolution_precisions(texts):
    """{operand_precision of each convolution in XLA's compiled HLO ("default" where it names none): count}."""
    found = {}
    for text in texts:
        for line in text.splitlines():
            if re.search(r"\bconvolution\(", line):
                match = re.search(r"operand_precision=\{(\w+),(\w+)\}", line)
                key = ",".join(dict.fromkeys(match.groups())) if match else "default"
                found[key] = found.get(key, 0) + 1
    return found


def run(tiny, folder, **settings):
    return fvis.run_job(tiny, "conv2", "0:2", folder, settings=fvis.Settings(steps=2, **settings),
                        **{k: v for k, v in FAST.items() if k != "steps"}).results


def test_highest_from_the_command_is_in_the_compiled_program_and_recorded(tmp_path, compiled_programs, caplog):
    """matmul_precision=highest: XLA's compiled convolutions carry HIGHEST, results.json says so, and the log names it."""
    cfg = composed("model=tiny", "matmul_precision=highest", "steps=2", "filters=0:2", "quality.enabled=false")
    with caplog.at_level("INFO", logger="fvis"):
        summary, _ = fvis.cli.run(cfg, tmp_path / "run")
    compiled = convolution_precisions(compiled_programs)
    assert set(compiled) == {"highest"} and compiled["highest"] >= 3  # forward and gradient convolutions
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["config"]["matmul_precision"] == "highest"
    record = written["matmul_precision"]
    assert {k: record[k] for k in ("setting", "level", "backend", "effective")} == {
        "setting": "highest", "level": "highest", "backend": "cpu", "effective": "float32"}
    assert list(record["in_program"]) == ["convolution"] and set(record["in_program"]["convolution"]) == {"f32 HIGHEST"}
    assert any("compiled in" in r.message and "convolutions in float32" in r.message for r in caplog.records)


def test_auto_follows_jax_and_an_explicit_level_overrides_it(tiny, tmp_path, compiled_programs):
    """auto keeps JAX's own setting; an explicit level wins over it; JAX's setting is the same after the job."""
    with jax.default_matmul_precision("float32"):
        auto = run(tiny, tmp_path / "auto")
        auto_compiled = convolution_precisions(compiled_programs)
        compiled_programs.clear()
        explicit = run(tiny, tmp_path / "explicit", matmul_precision="default")
        assert jax.config.jax_default_matmul_precision == "float32"
    assert jax.config.jax_default_matmul_precision is None
    assert set(auto_compiled) == {"highest"}
    assert (auto["matmul_precision"]["setting"], auto["matmul_precision"]["level"]) == ("auto", "highest")
    assert set(convolution_precisions(compiled_programs)) == {"default"}
    assert set(explicit["matmul_precision"]["in_program"]["convolution"]) == {"f32 DEFAULT"}


def test_jax_aliases_bind_their_levels_in_every_program_of_the_host_loop(tiny, tmp_path, compiled_programs):
    """tensorfloat32 is JAX's HIGH: init, step and finish of a host loop all carry it; mixed precision shows bf16."""
    results = run(tiny, tmp_path / "tf32", matmul_precision="tensorfloat32", loop="host", precision="bfloat16")
    assert set(convolution_precisions(compiled_programs)) == {"high"}
    assert len(compiled_programs) == 3
    record = results["matmul_precision"]
    assert (record["level"], record["effective"]) == ("high", "float32")
    assert set(record["in_program"]["convolution"]) == {"bf16 HIGH"}  # the layers compute in bfloat16


def test_a_resumed_job_records_the_same_programs_without_compiling(tiny, tmp_path, compiled_programs):
    """Every chunk reused: the record (from the earlier results.json, or the programs lowered anew) is unchanged."""
    first = run(tiny, tmp_path / "run", matmul_precision="highest")
    compiled_programs.clear()
    again = run(tiny, tmp_path / "run", matmul_precision="highest")
    (tmp_path / "run" / "results.json").unlink()  # resumed from images.npz alone: the programs are lowered
    lowered = run(tiny, tmp_path / "run", matmul_precision="highest")
    assert compiled_programs == []
    assert first["matmul_precision"] == again["matmul_precision"] == lowered["matmul_precision"]
    assert set(lowered["matmul_precision"]["in_program"]["convolution"]) == {"f32 HIGHEST"}


@pytest.mark.parametrize("setting, platform, capability, expected", [
    ("auto", "cpu", None, ("default", "float32")),
    ("highest", "cpu", None, ("highest", "float32")),
    ("default", "gpu", "9.0", ("default", "tensorfloat32")),
    ("high", "gpu", "8.0", ("high", "tensorfloat32")),
    ("highest", "gpu", "9.0", ("highest", "float32")),
    ("default", "gpu", "7.0", ("default", "float32")),  # V100: no TensorFloat-32
    ("bfloat16", "tpu", None, ("default", "bfloat16")),
    ("tensorfloat32", "tpu", None, ("high", "bfloat16_3x")),
    ("float32", "tpu", None, ("highest", "bfloat16_6x")),
])
def test_the_record_says_what_each_level_means_on_each_backend(setting, platform, capability, expected):
    """jax.lax.Precision's documented meaning per backend (level, what float32 operands become)."""
    device = types.SimpleNamespace(compute_capability=capability)
    record = matmul_precision.describe(setting, platform=platform, device=device)
    assert (record["level"], record["effective"]) == expected
    assert (record["setting"], record["backend"]) == (setting, platform)


@pytest.mark.parametrize("bad", ["hihgest", "HIGHEST", "fastest", "", None, 32, True])
def test_bad_values_are_refused_naming_what_works(bad):
    """A bad matmul_precision: one error naming the value received and the values that work."""
    with pytest.raises(InvalidValueError) as error:
        fvis.Settings(matmul_precision=bad)
    message = str(error.value)
    assert f"Received: matmul_precision={bad!r}" in message
    assert all(name in message for name in ("auto", "default", "high", "highest", "tensorfloat32", "float32"))


def test_the_command_refuses_a_bad_value_before_building_anything(tmp_path, monkeypatch):
    """fvis matmul_precision=fast: refused before the model is built, and no run folder is left."""
    monkeypatch.setattr(fvis.models, "tiny_convnet", lambda **kw: pytest.fail("the model was built"))
    with pytest.raises(FvisError, match="matmul_precision='fast'"):
        fvis.cli.run(composed("model=tiny", "matmul_precision=fast"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
