"""The stage contract: what a stage declares, what it is given, what it returns.

A stage's stage.py declares one `Stage`: its name, its settings' declaration (config type, the rounds
it runs in: stages/<name>/config.py), the upstream stages it reads, the extra inputs it needs (URL lists, seed or eval shards, a base model) and its
`run(cfg, inputs, ctx) -> Manifest`. `stages/__init__.py` names them in graph order; the runner
(pipeline/runner.py) walks that table and knows no stage by name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.executor import RAY, Executor
from pipeline.manifest import Accounting, Manifest
from pipeline.runs import RunDir, StageDir

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.config import RunConfig
    from pipeline.configbase import Section
    from pipeline.sources import Sources

@dataclass(frozen=True)
class StageContext:
    """Where a stage writes (`out`: its own folder, or the rebuild beside it) and what it is built from."""
    run: RunDir
    out: StageDir
    fingerprint: str
    input_fingerprints: tuple[str, ...]
    seed: int
    tracking: dict | None = None
    """How this run reaches its experiment trackers (pipeline/tracking.py); None: tracking off."""
    executor: Executor = RAY
    """Where its tasks, actors and training run (pipeline/executor.py): Ray, or this process."""

    def manifest(self, config: Any, shards: list[dict], started: float, details: dict | None = None,
                 totals: Accounting | None = None) -> Manifest:
        return Manifest.build(self.out, self.fingerprint, config, list(self.input_fingerprints), shards, started,
                              details, totals)


@dataclass(frozen=True)
class Upstream:
    """A committed upstream result a stage reads."""
    dir: StageDir
    manifest: Manifest

    @property
    def path(self) -> Path:
        return self.dir.path

    def exported_model(self) -> Path:
        """The model folder a training stage exported (its manifest's `export`)."""
        return self.path / self.manifest.details["export"]


@dataclass(frozen=True)
class Extra:
    """An input that is not an upstream stage's result, with the fingerprints of its content."""
    value: Any
    fingerprints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inputs:
    upstream: tuple[Upstream, ...]
    extra: dict[str, Any]

    def first(self) -> Upstream:
        return self.upstream[0]


@dataclass(frozen=True)
class Request:
    """What `vlp plan` shows and checks against the cluster: `count` bundles of `bundle`, granted at
    once if `gang` (Ray Train's workers), else one by one (shard tasks, actors)."""
    bundle: dict[str, float]
    count: int
    gang: bool
    shards: int | None
    samples: str


@dataclass(frozen=True)
class Stage:
    name: str
    section: "Section"
    """Its settings' declaration (stages/<name>/config.py): the config type, the rounds it runs in."""
    upstreams: Callable[["RunConfig", int], list[tuple[str, int]]]
    """(stage, round) of the committed results it reads; the first is its main input."""
    run: Callable[[Any, Inputs, StageContext], Manifest]
    request: Callable[["RunConfig", int | None], Request]
    """Its Ray resource request, given the number of URLs (None: unknown)."""
    extra_inputs: Callable[["RunConfig", int, "Sources", tuple[Upstream, ...]], dict[str, Extra]] = \
        lambda cfg, round_, sources, upstream: {}
    """Checked before Ray starts; their fingerprints enter the stage's, in the order given."""
    seeded: bool = False
    """Draws random numbers from the run's seed: a new seed is a new result."""
    conserves: bool = False
    """A filtering stage: every sample its main input kept must come in (checked after it runs)."""
    fetches: bool = False
    """Reads the URL lists' web: the toy web (if the run has one) is served while it runs."""
    curates_web: bool = False
    """Its output is the web's samples, cut as download's shards (download, prefilter, and every filter
    after them): the next such stage reads it, round 0's pretraining and CapFilt read the last (web_data)."""
    trains: bool = False
    """Trains the model: its result's `export` is a model folder (Upstream.exported_model); `vlp train`
    runs it under torchrun; the model card reads its config."""
    evaluates: bool = False
    """Measures a model it reads (its manifest's `metrics`): the model card quotes the newest."""
    models: tuple[str, ...] = ()
    """The folders of its result that hold a model (the report links their files)."""
    report: Callable[["ReportSection"], str] | None = None
    """Its section of the run's report (HTML with its own heading; pipeline/report.py), given its folders.
    None: the funnel, the stage table and the drop examples only."""
    fates: Callable[[StageDir], "pa.Table"] | None = None
    """(key, fate) of the web samples it judged, a table, for the report's fates per source (a fate its
    `fate_labels` names); the newest committed round is shown. None: it gives no verdict on web samples."""
    fate_labels: tuple[str, ...] = ()
    provides: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    """What it declares for other stages to read without naming it (`provided(what)`): e.g. the held-out
    data the evaluation reads and prefilter's decontamination screens against."""
    figures: Callable[[StageDir, Manifest, Callable[[], dict | None]], dict] | None = None
    """Its figures in the round-over-round table (`vlp status`, the report; pipeline/toyweb/measures.py),
    given its folder, its manifest and `truth()` (the toy web's truth by URL, or None on other data)."""
    retryable: Callable[[Manifest], int] | None = None
    """How many samples of a committed result failed in ways a new try may fix (timeouts, 5xx): `vlp
    resume --retry-failed` runs the stage again over them (StageDir.start_retry_pass). None: never."""

    @property
    def config(self) -> type:
        return self.section.config

    @property
    def rounds(self) -> str:
        return self.section.rounds

    def runs_in(self, round_: int) -> bool:
        return self.rounds == "every" or (self.rounds == "first") == (round_ == 0)


@dataclass(frozen=True)
class ReportSection:
    """What a stage's report section is given (Stage.report): the run, its folders (oldest round first;
    committed or stopped: `manifest()` is None for a stage that has not committed), the report's folder for its images (`out`), the toy web's truth (None on other data), and
    `link(path)`: an <a> to a file of the run, the path relative to the run directory."""
    run: RunDir
    dirs: tuple[StageDir, ...]
    out: Path
    truth: dict | None
    link: Callable[[str], str]

    def link_in(self, stage_dir: StageDir, name: str) -> str:
        """A link to file `name` of one of its folders."""
        return self.link(f"{stage_dir.path.relative_to(self.run.root).as_posix()}/{name}")


def having(flag: str) -> list[str]:
    """The registry's stages (graph order) whose declaration sets `flag` (e.g. "trains", "fetches")."""
    import stages

    return [n for n in stages.NAMES if getattr(stages.stage(n), flag)]


def declared(stage: str, attr: str, default: Any = None) -> Any:
    """What registry stage `stage` declares for `attr`; `default` for a name an older vlp wrote into a run
    (a manifest, a folder) that no stage has now."""
    import stages

    return getattr(stages.stage(stage), attr) if stage in stages.NAMES else default


def provided(what: str) -> Callable[..., Any]:
    """What the registry's stage that provides `what` declares for it (Stage.provides)."""
    import stages

    found = [stages.stage(n).provides[what] for n in stages.NAMES if what in stages.stage(n).provides]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} stages provide {what!r}; the registry must hold exactly one")
    return found[0]


def shard_tasks(cfg: "RunConfig", cpus: float, urls: int | None) -> Request:
    """The request of a stage that runs a task per web shard (a filter after download)."""
    shards = web_shards(cfg, urls)
    return Request({"CPU": cpus}, shards or 1, False, shards,
                   f"at most {urls if urls is not None else 'all listed'} in (what the stages before it keep)")


def web_shards(cfg: "RunConfig", urls: int | None) -> int | None:
    """How many shards the web's data is cut into: the fetching stage's, which every later filter keeps."""
    fetching = getattr(cfg, having("fetches")[0])   # the stage that cut them
    return None if urls is None else max(1, -(-urls // fetching.samples_per_shard))


def web_data(cfg: "RunConfig", before: str | None = None) -> tuple[str, int]:
    """(stage, 0) whose shards are the web's data as far as the run curates it: the last stage that
    `curates_web` among the config's stages (in the registry's order), or the last before stage `before`."""
    import stages

    names = stages.NAMES[:stages.NAMES.index(before)] if before else stages.NAMES
    every = [n for n in names if stages.stage(n).curates_web]
    chosen = [n for n in every if n in cfg.stages]
    return (chosen or every)[-1 if chosen else 0], 0   # none chosen: the web's first (its download)
