"""The one config tree: frozen dataclasses loaded strictly from YAML, with `--set a.b=c` overrides.

The run-level sections live here (Ray, the data, tracking); each stage's section is its own
(stages/<name>/config.py), and RunConfig gets one field per stage of the registry (stages/__init__.py):
a stage is named once. Each stage receives only its own sub-config (plus the run-level seed), never the root.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.configbase import LIST_FIELDS, require as _require
from pipeline.configtree import apply_override, build, to_plain
from pipeline.errors import ConfigError
from pipeline.toyweb.config import ToyWebConfig
from stages import NAMES, section


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address ("auto", "ray://host:10001"); None starts a local Ray for this run."""
    num_cpus: int | None = None
    """CPUs for a local Ray (None: all of this machine's). Ignored when `address` is set."""
    include_dashboard: bool = False
    """Start the dashboard with a local Ray (bound to 127.0.0.1)."""

    def __post_init__(self) -> None:
        _require(self.num_cpus is None or self.num_cpus >= 1, f"num_cpus: must be >= 1 (or null: all), got {self.num_cpus}")


# Numbers a URL list may carry per row (pipeline/data/urllists.py), kept in each sample's json (`list`)
# for prefilter's `list_rules`: LAION's CLIP similarity, NSFW and watermark probabilities, and the image
# size the list claims.


@dataclass(frozen=True, kw_only=True)
class UrlListConfig:
    """One URL list. `laion`, `cc3m` and `sbu` know their real column names; others need them."""
    path: str
    format: Literal["laion", "cc3m", "sbu", "parquet", "csv", "tsv", "json", "jsonl"]
    url_col: str | None = None
    caption_col: str | None = None
    name: str | None = None
    """Source name recorded in each sample's provenance (default: the file name)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Numeric columns to carry into each sample's json (`list`) for prefilter's `list_rules`: {field:
    column} with fields similarity, punsafe, pwatermark, width, height. Default: for `laion`, LAION's
    similarity, punsafe, pwatermark, WIDTH, HEIGHT where the file has them; none otherwise.
    Parquet, csv, tsv, jsonl and json (records) lists can carry them."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(LIST_FIELDS))
        _require(not unknown, f"columns: unknown field(s) {unknown}; known: {', '.join(LIST_FIELDS)}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    inputs: tuple[UrlListConfig, ...] = ()
    """URL lists to download. Relative paths are relative to the config file."""
    toyweb: ToyWebConfig | None = None
    """Generate the inputs from the toy web and serve it on 127.0.0.1 for the run."""
    seed_shards: str | None = None
    """A small clean, human-captioned webdataset (brace pattern; BLIP's COCO): CapFilt fine-tunes the
    captioner and the filter on it, and pretraining adds it to the web data. None: the toy web's seed split."""

    def __post_init__(self) -> None:
        _require(bool(self.inputs) or self.toyweb is not None,
                 "inputs: give at least one URL list, or a toyweb section")



@dataclass(frozen=True, kw_only=True)
class MlflowTracking:
    tracking_uri: str | None = None
    """Where runs go: a server (http://...) or a local store path; None: <run>/mlruns (a file store)."""
    experiment: str | None = None
    """Experiment name; None: the run's name."""


@dataclass(frozen=True, kw_only=True)
class WandbTracking:
    project: str | None = None
    """W&B project; None: the run's name."""
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    """offline: write under `dir` only (upload later with `wandb sync`)."""
    dir: str | None = None
    """Where W&B writes its files; None: <run>/wandb."""


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Experiment tracking, off unless a backend is given (pipeline/tracking.py): the resolved config as
    parameters, per-step training metrics, per-round curation and evaluation figures, the report."""
    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None


STAGE_ORDER = NAMES + ("report",)
"""Every stage of the graph in the order they run within a round; report (the HTML page, the engine's own
step: pipeline/report.py) comes last."""
DEFAULT_STAGES = tuple(name for name in NAMES if not section(name).optional) + ("report",)


def _check_run(self) -> None:
    _require(bool(self.name.strip()), "name: must not be empty")
    _require(len(set(self.stages)) == len(self.stages), f"stages: a stage is listed twice in {list(self.stages)}")
    # any order is accepted; the graph's order is the one kept (and dumped)
    object.__setattr__(self, "stages", tuple(s for s in STAGE_ORDER if s in self.stages))
    _require(self.rounds >= 0, f"rounds: must be >= 0, got {self.rounds}")
    for name in self.stages:
        if name != "report" and section(name).rounds == "later":
            _require(self.rounds >= 1, f"rounds: {name} runs in rounds 1.., so it needs rounds >= 1")


RUN_FIELDS = [
    ("name", str),
    ("seed", int, field(default=0)),
    ("run_dir", str | None, field(default=None)),
    ("stages", tuple[Literal[STAGE_ORDER], ...], field(default=DEFAULT_STAGES)),
    ("rounds", int, field(default=1)),
    ("log_level", Literal["DEBUG", "INFO", "WARNING", "ERROR"], field(default="INFO")),
    ("ray", RayConfig, field(default_factory=RayConfig)),
    ("data", DataConfig),
]
RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    RUN_FIELDS + [(name, section(name).config, field(default_factory=section(name).config)) for name in NAMES]
    + [("tracking", TrackingConfig, field(default_factory=TrackingConfig))],
    namespace={"__post_init__": _check_run, "__doc__": """A run: its name and seed, the stages it runs (`stages`,
default: every stage of the registry that is not optional, and the report), the bootstrapping `rounds` after
round 0 (round r's CapFilt cleans the web data with round r-1's model, round r pretrains on the result; 0:
no CapFilt), Ray, the data, one section per stage (stages/<name>/config.py) and tracking."""},
    frozen=True, kw_only=True)
RunConfig.__module__ = __name__   # pickled by name into Ray's workers


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load `path` strictly and apply `--set` overrides. Relative input paths resolve against the file."""
    from pipeline.storage import as_path

    path = as_path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text (byte {err.start}): is it a config file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"
        for assignment in overrides:
            apply_override(data, assignment, source)
    _resolve_input_paths(data, path.parent)
    return build(RunConfig, data, source=source)


def _resolve_input_paths(data: dict, base) -> None:
    from pipeline.storage import is_remote, is_url

    inputs = (data.get("data") or {}).get("inputs") if isinstance(data.get("data"), dict) else None
    for entry in inputs or ():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not is_url(entry["path"]):
            p = Path(entry["path"]).expanduser()
            entry["path"] = str(p if p.is_absolute() else (base / p) if is_remote(base) else (base / p).resolve())


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)
