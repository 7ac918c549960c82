"""The `fvis` command: a thin Hydra layer over the library.

    fvis                                   # the reference job (ResNet50V2, ImageNet)
    fvis model=efficientnet_lite0          # offline ImageNet model
    fvis -m steps=10,30                    # a sweep, one folder per job

The library never imports Hydra; this module composes the config, instantiates
the `_target_` factories it names, and calls `fvis.run_job(...)`. The library logs
the run's story on `logging`; Hydra's job logging (conf/config.yaml) writes it to the
run folder's cli.log and, through `ConsoleHandler`, to the console. The job returns
its quality score to Hydra, for sweepers that search (`search_figure`).
"""

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import hydra
import numpy as np
from tqdm.auto import tqdm
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

import fvis
from fvis import devices, distributed, images, optim, outputs, params, progress, runs
from fvis.errors import FvisError, InvalidValueError, did_you_mean
from fvis.models import check_image_size
from fvis.runfolder import FolderBusyError
from fvis.settings import Display, Quality, Settings

_MAX_DIR = 120
_ITEM = re.compile(r",(?=[A-Za-z_+~][\w.@/+~-]*=)")  # the comma before the next "key=" in an override list
_FILE_SUFFIXES = re.compile(r"(\.[A-Za-z][A-Za-z0-9]{0,7})+$")  # .weights.h5, .keras, .png (not .25_224)

log = logging.getLogger(__name__)


def run_dir_name(override_dirname):
    """A folder name for a run from its command-line overrides ("default" if none).

    The same command always gives the same folder, so running it again resumes. A file or
    folder path in a value is shown by its name without suffixes plus a hash of the whole
    path (`model.weights=../w/mobilenet_0.25_224.weights.h5` -> `model.weights=mobilenet_0.25_224-<hash>`);
    other unsafe characters become "_"; long names are cut and suffixed with a hash.
    """
    unescaped = re.sub(r"\\(.)", r"\1", override_dirname)  # Hydra writes filters=0\:8 in sweeps
    readable = ",".join(_shorten_path(item) for item in _ITEM.split(unescaped)) if unescaped else ""
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", readable) or "default"
    if len(name) > _MAX_DIR:
        name = name[: _MAX_DIR - 13] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def _shorten_path(item):
    """`key=<a path>` -> `key=<its name without suffixes>-<hash of the path>`; other items as they are.

    A value is a path when it has a "/" and starts with "/", "~", "." or "$", or ends in a file suffix
    (so a nested layer name such as `blocks/3/conv` stays as it is)."""
    key, sep, value = item.partition("=")
    is_path = "/" in value and (value[0] in "/~.$" or _FILE_SUFFIXES.search(value.rsplit("/", 1)[-1]))
    if not sep or not is_path:
        return item
    stem = _FILE_SUFFIXES.sub("", value.rstrip("/").rsplit("/", 1)[-1]) or "path"
    return f"{key}={stem}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"


OmegaConf.register_new_resolver("fvis_dir", run_dir_name, replace=True)
for _name in ("jax._src.xla_bridge", "jax._src.compilation_cache"):  # "no TPU", "Resetting cache" notices
    logging.getLogger(_name).setLevel(logging.WARNING)


def checked_settings(cfg):
    """The run's `Settings`, `Display` and `Quality` from the config, and every other plain value
    checked, before anything is loaded or compiled."""
    settings = Settings(steps=cfg.steps, batch_size=cfg.batch_size, images_per_unit=cfg.images_per_unit,
                        seed=cfg.seed, loop=cfg.loop, workers=cfg.workers, precision=cfg.precision,
                        matmul_precision=cfg.matmul_precision,
                        redirect_relu=cfg.redirect_relu, snapshots=cfg.snapshots)
    display = Display(**cfg.display)
    quality = Quality(**cfg.quality)
    optim.check_learning_rate(cfg.lr)
    rate = _optimizer_rate(cfg)
    if rate is not None:
        optim.check_learning_rate(rate, key="optimizer.learning_rate")
    if cfg.image_size is not None:
        check_image_size(cfg.image_size)
    _check_layer_names(cfg)
    for key in ("image", "start_image"):  # photos: read before the model loads
        if cfg.get(key) is not None:
            images.check_image_file(cfg.get(key), purpose=f"{key}={cfg.get(key)}")
    for group in ("model", "objective", "param", "transform", "optimizer"):
        _check_arg_types(cfg.get(group), group)
    return settings, display, quality


def _optimizer_rate(cfg):
    """The optimizer's learning_rate as configured (`${lr}`, or set directly: optimizer.learning_rate=0.1),
    or None where it has none or it is a schedule (a config node)."""
    rate = _given(cfg.optimizer, "learning_rate")
    return None if OmegaConf.is_config(rate) else rate


def _check_layer_names(cfg):
    """`layer` (and the objective's) is one layer name; a whole-model job lists its layers in `layers`."""
    for key, value in (("layer", _given(cfg, "layer")), ("objective.layer", _given(cfg.objective, "layer"))):
        if value is not None and not isinstance(value, str):
            raise InvalidValueError(f"{key} must be one layer name (a string); for several layers use "
                                    f"layers=[...]. Received: {key}={value}")


def _given(node, key):
    """`node[key]`, or None when absent or not set yet (`???`, directly or through an interpolation):
    instantiating the node reports those, with the key to set."""
    try:
        return node.get(key)
    except (MissingMandatoryValue, InterpolationResolutionError):
        return None


def _check_arg_types(node, key):
    """Each value given to a `_target_` factory has the type of the factory's default for it (the
    signature is the schema): a string where a number goes would otherwise fail only when traced."""
    if OmegaConf.is_list(node):
        for i in range(len(node)):
            _check_arg_types(node[i], f"{key}.{i}")
    if not OmegaConf.is_dict(node):
        return
    defaults = _defaults(node.get("_target_"))
    for name in (n for n in node if not n.startswith("_")):
        value, default = _given(node, name), defaults.get(name)
        if value is None:
            continue
        kind = _kind_needed(default, value)
        if kind:
            raise InvalidValueError(f"{key}.{name} must be {kind}, like its default {default!r} in "
                                    f"{node._target_}. Received: {key}.{name}={value!r}")
        _check_arg_types(value, f"{key}.{name}")


def _defaults(target):
    hydra_log = logging.getLogger("hydra.utils")
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)  # get_object logs a failure before raising; instantiate reports it in one line
    try:
        parameters = inspect.signature(get_object(target)).parameters.values() if target else ()
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}  # instantiate reports an unknown target
    finally:
        hydra_log.setLevel(level)
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _kind_needed(default, value):
    """What `value` should be, given a bool, int or float `default`; None when it fits or nothing is known."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return None if number and isinstance(value, int) else "an integer"
    if isinstance(default, float):
        return None if number else "a number"
    return None


def _instantiate(node, **kwargs):
    """`instantiate(node, **kwargs)`; a factory's own error (FvisError, or a TypeError/ValueError
    from a value of the wrong type) becomes one line naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, FvisError):
            raise cause
        if isinstance(cause, (TypeError, ValueError)):
            raise InvalidValueError(_build_error(e, node, kwargs)) from e
        raise


def _build_error(exc, node, kwargs):
    """The line "group: could not build target(key=value, ...): cause" for Hydra's InstantiationException."""
    target = re.search(r"target '([^']+)'", str(exc))
    full_key = re.search(r"full_key: (\S+)", str(exc))
    key = full_key.group(1) if full_key else str(node._key())
    inner = key.split(".", 1)[1] if "." in key else None  # a node inside `node` (e.g. transform.transforms.0)
    try:
        part = OmegaConf.select(node, inner) if inner else node
        args = {k: v for k, v in OmegaConf.to_container(part, resolve=True).items() if not k.startswith("_")}
    except (OmegaConfBaseException, AttributeError, ValueError):
        args = {}
    if not inner:
        args.update(kwargs)
    call = ", ".join(f"{k}={v!r}" for k, v in args.items())
    call = call if len(call) <= 160 else call[:157] + "..."
    return (f"{key}: could not build {target.group(1) if target else '?'}({call}): {exc.__cause__}. "
            f"Check the values given to {key}.")


def run(cfg, out_dir, *, keep_refused=False):
    """Runs the job a composed config describes and writes its outputs to `out_dir`.

    One layer (`layer`) or, when `layers` is set, a whole-model job with one folder
    per layer and an atlas (`fvis.run_job`). The attempt is recorded in run.json, a
    failure in error.json (see `fvis.outputs.attempt`). A job refused before compute (bad
    input) leaves the folder as it found it, unless `keep_refused` (a sweep's job).

    Returns:
        (the dict written to results.json, this attempt's record in run.json).
    """
    if _start_distributed(cfg) and not distributed.is_writer():
        with tempfile.TemporaryDirectory(prefix="fvis-process-") as scratch:  # computes its share, writes nothing
            return _run(cfg, scratch, {}, quality_enabled=False)
    with outputs.attempt(out_dir, keep_refused=keep_refused) as record:
        return _run(cfg, out_dir, record)


def _start_distributed(cfg):
    """Starts JAX's distributed runtime when the config's `distributed` keys ask for it (before
    anything else uses JAX); True for a multi-host run."""
    keys = OmegaConf.to_container(cfg.distributed) if cfg.get("distributed") is not None else {}
    unknown = sorted(set(keys) - set(distributed.KEYS))
    if unknown:
        raise InvalidValueError(f"Unknown key(s) {unknown} in distributed; it takes {list(distributed.KEYS)}. "
                                f"Received: {keys}")
    return distributed.initialize(**keys)


def _run(cfg, out_dir, record, *, quality_enabled=None):
    """`run`'s job in `out_dir`, filling the attempt `record`."""
    record["versions"] = _versions()
    start = time.perf_counter()
    settings, display, quality = checked_settings(cfg)
    if quality_enabled is not None:
        quality = dataclasses.replace(quality, enabled=quality_enabled)
    devices.use_compilation_cache(cfg.compilation_cache)  # first: building a Keras model compiles too
    preset = _preset()
    log.info("job: %s -> %s", _job_line(cfg, preset), out_dir)
    with progress.phase("building the model", log) as done:
        model, reused = _model(cfg)
        done("model %s %s (%dx%d)", model.name, "reused from the previous job" if reused else "built",
             *model.image_size)
    record["model_reused"] = reused
    record["timings"] = {"load_model_s": time.perf_counter() - start}
    resolved = OmegaConf.to_container(cfg, resolve=True)  # after the model: it reports its own ??? keys first
    if preset is not None:  # recorded in results.json (and the report); absent for the reference
        resolved["experiment"] = preset
    layers = resolved.get("layers")
    param = _instantiate(cfg.param)
    if cfg.start_image is not None:
        param = params.start_from(param, cfg.start_image)
    outcome = runs.run_job(model, _objective(cfg, layers), resolved["filters"], out_dir, layers=layers,
                           param=param, transform=_instantiate(cfg.transform),
                           optimizer=_optimizer(cfg.optimizer), settings=settings, display=display,
                           quality=quality, config=resolved, attempt=record)
    record["timings"]["total_s"] = time.perf_counter() - start
    return outcome.results, record


def _optimizer(node):
    """The optimizer config's optax transformation, its learning rate held in its state
    (`optim.learning_rate_in_state`): the jobs of an lr sweep share one compiled step."""
    plain = _instantiate(node)  # the factory's own errors, named as the config group's
    factory = _instantiate(node, _partial_=True)
    return plain if factory.args else optim.learning_rate_in_state(factory.func, **factory.keywords)


_LAST_MODEL = {}  # this process' last Keras model built from a config: key, model, digest of its variables


def _model(cfg):
    """(the job's model, whether it is the previous job's): a sweep's jobs in one process (Hydra's basic
    launcher) share the model when its config, image size and the files it names are the same, and its
    variables still hold what they held when it was built (fvis never writes them; a changed model is
    built again). Only Keras models are kept, one at a time."""
    image_size = None if cfg.image_size is None else tuple(cfg.image_size)
    key = _model_key(cfg.model, image_size)
    if key is not None and _LAST_MODEL.get("key") == key and _variables_digest(_LAST_MODEL["model"]) == \
            _LAST_MODEL["digest"]:
        return _LAST_MODEL["model"], True
    _LAST_MODEL.clear()  # the previous model goes before the next one is built
    model = _instantiate(cfg.model, image_size=image_size)
    if key is not None and isinstance(model, fvis.models.KerasModel):
        _LAST_MODEL.update(key=key, model=model, digest=_variables_digest(model))
    return model, False


def _model_key(node, image_size):
    """The model config and image size as a string, with the SHA-256 of each file the config names; None
    when it cannot be resolved (instantiating it reports why)."""
    try:
        values = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return None
    files = {}
    for value in _leaves(values):
        try:
            path = Path(value).expanduser()
            if path.is_file():  # regular files only
                files[value] = hashlib.sha256(path.read_bytes()).hexdigest()
        except (TypeError, ValueError, OSError):  # not a path, or not readable
            continue
    return json.dumps([values, image_size, files], sort_keys=True, default=str)


def _leaves(value):
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _variables_digest(model):
    """SHA-256 of every variable of a `KerasModel`'s Keras model (path, dtype, shape, values)."""
    digest = hashlib.sha256()
    for variable in model.model.variables:
        value = np.asarray(variable.value)
        digest.update(f"{variable.path}{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _objective(cfg, layers):
    """The objective, or for a whole-model job the function layer -> objective."""
    if layers is None:
        return _instantiate(cfg.objective)
    if "layer" not in cfg.objective:
        raise InvalidValueError(f"layers=... needs an objective that takes a layer (channel, neuron, "
                                f"deepdream); objective '{cfg.objective._target_}' does not.")
    return lambda layer: _instantiate(cfg.objective, layer=layer)


def _preset():
    """The preset chosen with experiment=NAME (Hydra's runtime choice), or None."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def _job_line(cfg, preset):
    """The run's settings in one line: model, layer(s), filters, steps, lr, image size, seed, preset.
    Values not set yet (`???`) show as "?": building the model or the objective reports them."""
    value = lambda node, key: "?" if _given(node, key) is None else _given(node, key)
    model = cfg.model
    name = _given(model, "name") or str(_given(model, "_target_") or "?").rsplit(".", 1)[-1]
    layers = _given(cfg, "layers")
    where = f"layer {value(cfg, 'layer')}" if layers is None else f"layers {layers}"
    size = _given(cfg, "image_size")
    size = "the model's own" if size is None else "x".join(str(v) for v in size)
    rate = _optimizer_rate(cfg)
    lr = value(cfg, "lr") if rate is None else rate
    return (f"model {name}, {where}, filters {value(cfg, 'filters')}, {value(cfg, 'steps')} steps, "
            f"lr {lr}, image {size}, seed {value(cfg, 'seed')}, preset {preset or 'none'}")


def _versions():
    import jax
    return {"fvis": fvis.__version__, "jax": jax.__version__, **fvis.models.framework_versions(),
            "python": platform.python_version(), "device": str(jax.devices()[0].device_kind),
            "device_count": jax.device_count()}


def _done_line(summary, record, out_dir):
    t, chunks = record["timings"], record["chunks"]
    reused = f", {chunks['reused']} of {chunks['total']} chunks reused" if chunks["reused"] else ""
    if "layers" in summary:
        what = f"{sum(e['filters'] for e in summary['layers'])} images over {len(summary['layers'])} layers"
        where = f"{out_dir}/index.html"
    else:
        what, where = f"{len(summary['filters'])} images of {summary['objective']}", f"{out_dir}/grid.png"
    lines = [f"{what} -> {where} (compile {t['compile_s']:.1f} s, optimise {t['optimize_s']:.1f} s{reused})"]
    if "quality" in summary:
        lines.append(f"quality {runs.headline(summary['quality'])} -> {out_dir}/report.html")
    return lines


def _user_message(exc):
    """The one-line message for an error caused by the user's input, else None."""
    if isinstance(exc, FvisError):
        return str(exc)
    if isinstance(exc, OmegaConfBaseException):  # e.g. a mandatory value (???) left unset
        key = getattr(exc, "full_key", None)
        hint = f" Set it on the command line, e.g. `fvis ... {key}=VALUE`." if key else ""
        return f"{str(exc).splitlines()[0]}.{hint}"
    return None


def _remove_refused_folder(out_dir):
    """Removes a single run's folder that holds no run (its job was refused before compute, and
    `fvis.outputs.attempt` took its own files back): Hydra's `.hydra/` and log, then the folder if empty."""
    folder = Path(out_dir)
    if any((folder / name).exists() for name in ("run.json", "results.json", "chunks", "images.npz")):
        return
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    if HydraConfig.initialized():
        (folder / f"{HydraConfig.get().job.name}.log").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


class RunFolderCheck(Callback):
    """Checks that the run's (or sweep's) folder can be created before Hydra makes it, so an
    unwritable `hydra.run.dir` is one line (exit 2) rather than Hydra's traceback."""

    def on_run_start(self, config, **kwargs):
        _check_folder("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs):
        _check_folder("hydra.sweep.dir", config.hydra.sweep.dir)


def _check_folder(key, folder):
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"fvis: error: {key}: cannot create the folder '{folder}' ({type(e).__name__}: {e.strerror or e}). "
              f"Pass a folder you can write to. Received: {key}={folder}", file=sys.stderr)
        sys.exit(2)


def main():
    """The `fvis` command: checks the config-group choices on the command line, then runs Hydra
    (see `run_command` for what a job prints and its exit status)."""
    message = config_group_typo(sys.argv[1:])
    if message:
        print(f"fvis: error: {message}", file=sys.stderr)
        sys.exit(2)
    if _other_process(sys.argv[1:]):  # a multi-host run's process > 0: no .hydra/ or log file in the run folder
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _hydra_main()


def _other_process(args):
    """Whether the command line makes this process one of a multi-host run's processes other than 0
    (distributed.process_id=i, i > 0; or distributed.auto=true under SLURM or Open MPI with rank > 0)."""
    ids = [a.split("=", 1)[1] for a in args if a.startswith("distributed.process_id=")]
    if "distributed.auto=true" in args:
        ids += [os.environ.get(k, "0") for k in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK")]
    return any(i.isdigit() and int(i) > 0 for i in ids)


@hydra.main(version_base="1.3", config_path="pkg://fvis.conf", config_name="config")
def _hydra_main(cfg):
    """Hydra entry point (see `run_command` for what it logs and its exit status); returns the
    job's `search_figure` to Hydra's sweeper."""
    hydra_cfg = HydraConfig.get()
    summary = run_command(cfg, hydra_cfg.runtime.output_dir, in_sweep=hydra_cfg.mode == RunMode.MULTIRUN)
    return search_figure(summary)


def search_figure(summary):
    """What a job returns to Hydra, for a sweeper that searches (`fvis -m search=...`): the run's
    `quality.score` (see `fvis.quality.score`); None for a failed job, a whole-model job or
    `quality.enabled=false` (a searching sweeper counts that trial as failed)."""
    return (summary or {}).get("quality", {}).get("score")


CONFIG_GROUPS = ("model", "objective", "param", "transform", "optimizer", "experiment")


def config_group_typo(args):
    """The one-line "Unknown param 'fourierr'. Did you mean 'fourier'? ..." for the first choice of
    an fvis config group on the command line (`param=fourierr`, or in a sweep `-m param=pixel,fourierr`)
    that names no config file; None when every choice exists (or Hydra will report a malformed override)."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except HydraException:
        return None
    for override in overrides:
        group = override.key_or_group
        if group not in CONFIG_GROUPS or override.is_delete():
            continue
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        except HydraException:  # glob(...) and other sweeps Hydra resolves against the config
            continue
        choices = _group_options(group)
        for value in values:
            if isinstance(value, str) and value not in choices and value != "null":
                return did_you_mean(value, choices, kind=group)
    return None


def _group_options(group):
    """The config names of one fvis config group (the YAML files in fvis/conf/<group>)."""
    return sorted(p.name[:-5] for p in resources.files("fvis.conf").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


def run_command(cfg, out_dir, *, in_sweep=False):
    """Runs one job of the command and reports it on the terminal.

    A bad input prints one line and exits with status 2, leaving no run folder (a folder
    another live job holds is refused the same way, untouched); Ctrl-C prints one line and
    exits with status 130 (run.json says "interrupted"; the finished chunks are kept,
    and the same command resumes). In a multirun, a job that fails is recorded in its
    folder (error.json) and the sweep goes on; the sweep callback (`fvis.sweep`)
    reports failed jobs at the end.

    Returns:
        The dict written to results.json; None for a job that failed in a sweep.
    """
    try:
        summary, record = run(cfg, out_dir, keep_refused=in_sweep)
    except KeyboardInterrupt:
        print(f"fvis: interrupted; finished chunks are saved in {out_dir}, run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        message = _user_message(e)
        if not in_sweep and not isinstance(e, FolderBusyError):
            _remove_refused_folder(out_dir)
        if message is None and not in_sweep:
            raise  # a bug, not a bad input: keep the traceback
        where = f" (job {out_dir}, details in its error.json)" if in_sweep else ""
        print(f"fvis: error: {message or f'{type(e).__name__}: {e}'}{where}", file=sys.stderr)
        if in_sweep:
            return None
        sys.exit(2)
    if not distributed.is_writer():
        log.info("this process computed its share of %d images; process 0 writes the run folder",
                 len(summary.get("filters", [])))
        return None
    for line in _done_line(summary, record, out_dir):
        log.info(line)
    return summary


class ConsoleFormatter(logging.Formatter):
    """Console lines of the job's log: "fvis: <message>" for fvis' loggers, "<logger>: <message>" for
    others, with the level from WARNING up (cli.log keeps Hydra's timestamped format)."""

    def format(self, record):
        head = "fvis" if record.name.split(".")[0] == "fvis" else record.name
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"{head}: {level}{record.getMessage()}"
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class ConsoleHandler(logging.StreamHandler):
    """The console side of the job's log (conf/config.yaml, `hydra.job_logging`).

    Lines are written around a progress bar (`tqdm.write`). When stderr is a terminal the
    bars show the chunks, so per-chunk lines (records marked `fvis.progress.PROGRESS`) are
    left out of the console; cli.log and a pipe (SLURM, `| tee`) get every line.
    """

    def emit(self, record):
        if getattr(record, progress.PROGRESS, False) and _terminal():
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's rule: a failing handler reports and goes on
            self.handleError(record)


def _terminal():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
