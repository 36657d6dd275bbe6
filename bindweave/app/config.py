"""The settings schema of every entry point, and the check that runs before anything is loaded.

The settings dataclasses (``ModelSettings``, ``SamplerSettings``, ``VideoSettings``,
``ParallelSettings``, ``QwenSettings``, ...) are the one source of their fields and defaults. They
are registered with Hydra's ConfigStore as the schema of each entry point's config
(``generate_schema``, ``extract_schema``, ``refine_schema``; the YAML files in ``conf/`` list theirs
first in ``defaults`` and only override it). So a preset or an override with an unknown key, or a
value of the wrong type, fails while Hydra composes, and :func:`check_command_line` turns that
failure into one line naming the key, where it came from (the file or the override) and the fix
(``model.attention_kernal`` -> did you mean ``model.attention_kernel``?). Building the settings
objects then runs each dataclass's own value checks (enumerations, ranges), still before any
weight is read.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from bindweave.errors import BindWeaveInputError
from bindweave.settings.model import ModelSettings, VideoSettings
from bindweave.settings.qwen import QwenSettings
from bindweave.serve.settings import ServeSettings
from bindweave.settings.sampling import CacheSettings, SamplerSettings
from bindweave.settings.parallel import ParallelSettings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
ON_ERROR_CHOICES = ("fail", "skip")


# ``${now:}`` is resolved by each process on its own clock, so under torchrun or srun two ranks can
# disagree about the output folder by a second. ``${run_stamp:}`` is the same on every rank of a
# launch, and a requeued Slurm job gets its old folder back (so it resumes there).
def run_stamp() -> str:
    if os.environ.get("BINDWEAVE_RUN_STAMP"):
        return os.environ["BINDWEAVE_RUN_STAMP"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # shared by all ranks of one torchrun launch
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)



@dataclass(frozen=True)
class DataSettings:
    """Where a job's samples are (conf/data)."""

    meta_path: str | None = None  # the meta JSON; null: the built-in demo cases (tiny models only)
    image_root: str | None = None  # img_paths are relative to this (official BASE_IMG_DIR); null: the meta file's folder
    demo_dir: str = ".cache/demo-cases"  # where the built-in demo cases are drawn

    def meta_and_image_root(self) -> tuple[Path, Path | None]:
        """Stages 1 and 2: the meta JSON and its image root; with ``meta_path`` null the built-in demo
        cases (drawn on first use; their images sit beside their meta file)."""
        if self.meta_path is None:
            from bindweave.testing.demo_cases import write_demo_cases

            return write_demo_cases(Path(self.demo_dir)), Path(self.demo_dir)
        return Path(self.meta_path), Path(self.image_root) if self.image_root else None


def require_stage3_inputs(model: ModelSettings, data: DataSettings) -> None:
    """A stage-3 job (generate, calibrate) names its weights, and a meta JSON unless it is the tiny demo."""
    model.require_weights()
    if data.meta_path is None and not model.tiny_root:
        raise BindWeaveInputError("data.meta_path is not set: pass data.meta_path=META_JSON "
                                  "data.image_root=IMAGE_DIR (the built-in demo cases need model=tiny)")


@dataclass(frozen=True)
class GenerateConfig:
    """Stage 3 (``launch/generate.py``)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    video: VideoSettings = field(default_factory=VideoSettings)
    data: DataSettings = field(default_factory=DataSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)  # step caching (conf/speed/fastest.yaml turns it on)
    output_dir: str = "outputs/${run_stamp:}"  # videos + sidecars; one name on every rank (run_stamp)
    overwrite: bool = False  # finished samples (MP4 + sidecar) are skipped unless true
    on_error: str = "fail"  # fail | skip (report bad samples, finish the others, exit 1)
    progress: bool = True  # progress bars (samples, steps)

    def __post_init__(self):
        if self.on_error not in ON_ERROR_CHOICES:
            raise BindWeaveInputError(f"on_error={self.on_error}: use on_error=fail or on_error=skip")
        require_stage3_inputs(self.model, self.data)


@dataclass(frozen=True)
class ServeConfig:
    """``launch/serve.py`` (bindweave/serve/, docs/SERVING.md): the models loaded once, the per-job
    defaults (video, sampler, cache), the layout of a torchrun replica (``parallel``) and ``serve``.
    A request may change size, frames, steps, guidance, seed and the step cache."""

    model: ModelSettings = field(default_factory=ModelSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    video: VideoSettings = field(default_factory=VideoSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)  # the default step cache (conf/speed/)
    qwen: QwenSettings = field(default_factory=QwenSettings)  # stage 2, run per request in memory (rank 0)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)  # one replica = one torchrun group
    serve: ServeSettings = field(default_factory=ServeSettings)

    def __post_init__(self):
        self.model.require_weights()
        self.qwen.require_weights()


@dataclass(frozen=True)
class CalibrateConfig:
    """Step-cache calibration (``launch/calibrate.py``): exact jobs of the size and step count the
    cached runs will use."""

    model: ModelSettings = field(default_factory=ModelSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    video: VideoSettings = field(default_factory=VideoSettings)
    data: DataSettings = field(default_factory=DataSettings)
    output: str = "calibration/step_cache.json"  # the calibration JSON (cache.calibration=... reads it)
    samples: int = 2  # the first N samples of the meta JSON (sorted by id); their statistics are averaged
    progress: bool = True

    def __post_init__(self):
        if self.samples < 1:
            raise BindWeaveInputError(f"samples={self.samples} must be >= 1")
        if self.sampler.num_steps < 3:
            raise BindWeaveInputError(f"sampler.num_steps={self.sampler.num_steps}: calibration needs >= 3 steps "
                                      "(use the step count of the runs it is for)")
        require_stage3_inputs(self.model, self.data)


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 2 (``launch/extract.py``)."""

    qwen: QwenSettings = field(default_factory=QwenSettings)
    data: DataSettings = field(default_factory=DataSettings)
    output_dir: str = "outputs/extract"  # hidden_states/<id>.safetensors and the new meta JSON; re-runs resume here
    output_meta: str | None = None  # null: <output_dir>/meta_with_features.json (never the input file)
    write_official_pt: bool = False  # also write <id>_hidden_states.pt / _negative.pt and name them in the meta
    on_error: str = "fail"  # fail | skip (report bad samples, finish the others, exit 1; <output_dir>/failed.json)
    progress: bool = True  # progress bar (rank 0)

    def __post_init__(self):
        if self.on_error not in ON_ERROR_CHOICES:
            raise BindWeaveInputError(f"on_error={self.on_error}: use "
                                      + " or ".join(f"on_error={choice}" for choice in ON_ERROR_CHOICES))
        self.qwen.require_weights()


@dataclass(frozen=True)
class RefineConfig:
    """Stage 1 (``launch/refine.py``). ``refiner`` is an ``EndpointSettings`` (refiner=openai) or a
    ``LocalSettings`` (refiner=local, tiny_demo): each option of conf/refiner extends its schema."""

    qwen: QwenSettings = field(default_factory=QwenSettings)
    data: DataSettings = field(default_factory=DataSettings)
    refiner: Any = MISSING
    output_dir: str = "outputs/refine"  # the new meta JSON goes here; re-runs resume from it
    output_meta: str | None = None  # null: <output_dir>/meta_refined.json (never the input file)
    on_error: str = "fail"  # fail | skip (report bad samples, finish the others, exit 1; <output_dir>/failed.json)
    progress: bool = True

    def __post_init__(self):
        from bindweave.settings.refine import LocalSettings

        if self.on_error not in ON_ERROR_CHOICES:
            raise BindWeaveInputError(f"on_error={self.on_error}: use "
                                      + " or ".join(f"on_error={choice}" for choice in ON_ERROR_CHOICES))

        if isinstance(self.refiner, LocalSettings):
            self.qwen.require_weights()


def _writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses become read-only config nodes, which presets and overrides could not set;
    the settings objects built from the composed config are frozen again."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def register_schemas() -> None:
    """Put each entry point's schema (and the refiner options' schemas) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from bindweave.settings.refine import EndpointSettings, LocalSettings

    register_resolvers()
    store = ConfigStore.instance()
    for name, schema in (("generate_schema", GenerateConfig), ("extract_schema", ExtractConfig),
                         ("refine_schema", RefineConfig), ("calibrate_schema", CalibrateConfig),
                         ("serve_schema", ServeConfig)):
        store.store(name=name, node=_writable(OmegaConf.structured(schema)))
    store.store(group="refiner", name="openai_schema", node=_writable(OmegaConf.structured(EndpointSettings)))
    store.store(group="refiner", name="local_schema", node=_writable(OmegaConf.structured(LocalSettings)))


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """``config_name`` with ``overrides``, composed as the entry point would (for checks and tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():  # e.g. a check inside a running Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def settings_of(cfg: DictConfig):
    """The settings objects of a composed config (each dataclass runs its own checks)."""
    _refuse_keys_outside_schema(cfg, "")
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        raise BindWeaveInputError(f"{error.full_key} is not set: pass {error.full_key}=...") from None
    except OmegaConfBaseException as error:
        raise BindWeaveInputError(_first_line(error)) from None
    except (TypeError, ValueError) as error:
        raise BindWeaveInputError(str(error)) from None


def _refuse_keys_outside_schema(node: DictConfig, prefix: str) -> None:
    """Keys forced in with ``+key=value`` pass composition but are no field of their settings class."""
    schema = OmegaConf.get_type(node)
    names = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in node:
        if names is not None and key not in names:
            hint = _did_you_mean_key(f"{prefix}{key}", [f"{prefix}{name}" for name in sorted(names)])
            raise BindWeaveInputError(f"unknown setting {prefix}{key}{hint}")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _refuse_keys_outside_schema(child, f"{prefix}{key}.")


# ---- the check before Hydra runs the command ---------------------------------------------------------


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Compose every job of this command line and build its settings; raise BindWeaveInputError
    (one line: the key, the file or override, the fix) on the first problem.

    Runs before Hydra does, so a typo never reaches a traceback or a model load. A ``-m`` sweep is
    checked value by value (each swept value once, the other sweeps at their first value).
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg:
        return  # Hydra's own read-only commands
    config_name = args.config_name or config_name
    for overrides in _jobs_to_check(args.overrides, args.multirun):
        cfg = _compose_or_explain(config_name, overrides)
        settings_of(cfg)


def _jobs_to_check(overrides: list[str], multirun: bool) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed]

    def as_override(index: int, value: str) -> str:
        return value if not parsed[index].is_sweep_override() else f"{parsed[index].get_key_element()}={value}"

    first = [as_override(i, options[0]) for i, options in enumerate(values)]
    jobs = [first]
    for i, options in enumerate(values):
        jobs += [first[:i] + [as_override(i, value)] + first[i + 1:] for value in options[1:]]
    return jobs


def _compose_or_explain(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra.errors import HydraException

    try:
        return compose_config(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise BindWeaveInputError(explain_composition_error(error, config_name, overrides)) from None


def explain_composition_error(error: Exception, config_name: str, overrides: list[str]) -> str:
    """One line for a composition failure: the key, where it came from, and the fix."""
    text = str(error)
    cause = error.__cause__
    unknown_group = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if unknown_group:
        group, name = unknown_group.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        hint = _did_you_mean(name, options)
        return (f"{group}={name}: there is no conf/{group}/{name}.yaml{hint}; "
                f"choose one of {', '.join(o for o in options if not o.endswith('_schema'))}")
    key = _full_key(text, cause)
    source = _source(text, key, overrides)
    if "not in struct" in text or "not in '" in text or "Could not override" in text or "ConfigKeyError" in text \
            or "ConfigAttributeError" in text:
        known = _known_keys(config_name)
        return f"unknown setting {key} {source}{_did_you_mean_key(key, known)}"
    reason = _head(cause) if cause is not None else _reason(text)
    return f"{key or 'a setting'} {source}: {reason}"


def _full_key(text: str, cause: BaseException | None) -> str:
    if cause is not None and getattr(cause, "full_key", None):
        return str(cause.full_key)
    match = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text) \
        or re.search(r"Error merging override \+*([^=\s]+)=", text)
    return match.group(1) if match else ""


def _source(text: str, key: str, overrides: list[str]) -> str:
    preset = re.search(r"^In '([^']+)'", text)
    if preset:
        return f"in conf/{preset.group(1)}.yaml"
    for override in overrides:
        if key and override.lstrip("+~").split("=", 1)[0] == key:
            return f"(command-line override {override})"
    return "(command line)"


def _reason(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
        ("full_key", "reference_type", "object_type", "In '"))]
    return lines[-1] if lines else text


def _head(error: BaseException) -> str:
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def _first_line(error: BaseException) -> str:
    head, key = _head(error), getattr(error, "full_key", None)
    return f"{key}: {head}" if key and key not in head else head


def _known_keys(config_name: str) -> list[str]:
    """Every dotted key of the entry point's default config (the schema's fields and the presets')."""
    cfg = compose_config(config_name, [])
    keys: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node:
            child = node._get_node(name)
            keys.append(f"{prefix}{name}")
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{name}.")

    walk(cfg, "")
    return keys


def _did_you_mean_key(key: str, known: list[str]) -> str:
    parent, _, leaf = key.rpartition(".")
    if parent.rpartition(".")[2] == leaf:
        return (f": the keys sit one level too deep ({key}.*); a group file must put them at {parent}.* "
                "(a file with '# @package _global_' starts from the top: model:, video:, ...)")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.75)
    if not close:  # misplaced: the same name under another group (e.g. model.seed -> sampler.seed)
        close = [k for k in known if k.rpartition(".")[2] == leaf]
    if not close:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return f": did you mean {close[0]}?"
    shown = [k.rpartition(".")[2] for k in siblings]
    return f": valid keys{' of ' + parent if parent else ''} are {', '.join(shown)}" if shown else ""


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
