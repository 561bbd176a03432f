"""Experiment tracking in MLflow and W&B (`tracking:` in the config; both off by default).

What goes where:
  * the pipeline run (the driver): the resolved config as parameters; after each stage commits, its
    accounting (in / kept / dropped / failed) and, for evaluate, the retrieval and probe figures, as
    `<stage>/<figure>` at step = round; the HTML report as an artifact;
  * one training run per pretrain result (rank 0 of the training, a child of the pipeline run: MLflow's
    parent-run tag, W&B's group): loss per objective, lr, samples/s at each logged step.
One writer per tracking run, so the driver and the training processes never append to the same one.
The pipeline run's ids are kept in `<run>/tracking.json`: `vlp resume` continues the same runs, and a
training run is found again by its stage fingerprint.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from pipeline.configtree import to_plain
from pipeline.fsutil import atomic_write_bytes
from pipeline.storage import as_path

log = logging.getLogger("vlp")
IDS_FILE = "tracking.json"


def settings(cfg, run_root) -> dict | None:
    """The plain settings a process needs to reach the run's trackers (passed to training workers), with
    defaults resolved against the run directory and the pipeline run's ids; None when tracking is off."""
    t = cfg.tracking
    if t.mlflow is None and t.wandb is None:
        return None
    root = as_path(run_root)
    from pipeline.errors import ConfigError
    from pipeline.storage import is_remote

    if is_remote(root) and ((t.mlflow and not t.mlflow.tracking_uri) or (t.wandb and not t.wandb.dir)):
        raise ConfigError("tracking: a run directory on object storage needs tracking.mlflow.tracking_uri "
                          "(a server or a local path) and tracking.wandb.dir (a local folder)")
    ids_path = root / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    out = {"name": cfg.name, "ids": ids}
    if t.mlflow is not None:
        out["mlflow"] = {"tracking_uri": t.mlflow.tracking_uri or str(root / "mlruns"),
                         "experiment": t.mlflow.experiment or cfg.name}
    if t.wandb is not None:
        out["wandb"] = {**to_plain(t.wandb), "project": t.wandb.project or cfg.name,
                        "dir": t.wandb.dir or str(root / "wandb")}
    return out


class Tracker:
    """The backends one process writes to, for one tracking run."""

    def __init__(self, backends: list):
        self.backends = backends

    def params(self, values: dict) -> None:
        for b in self.backends:
            b.params(values)

    def metrics(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for b in self.backends:
            b.metrics(values, step)

    def artifact(self, path: Path) -> None:
        for b in self.backends:
            b.artifact(path)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def pipeline_tracker(cfg, run_root) -> Tracker | None:
    """The driver's tracker (creating the pipeline run, or continuing the one tracking.json names)."""
    conf = settings(cfg, run_root)
    if conf is None:
        return None
    ids = dict(conf["ids"])
    backends = []
    if "mlflow" in conf:
        backends.append(_Mlflow(conf["mlflow"], ids.get("mlflow"), run_name=cfg.name, tags={}))
        ids["mlflow"] = backends[-1].run_id
    if "wandb" in conf:
        ids.setdefault("wandb", f"{cfg.name}-{uuid.uuid4().hex[:8]}")
        backends.append(_Wandb(conf["wandb"], ids["wandb"], name=cfg.name, group=ids["wandb"], job_type="pipeline"))
    atomic_write_bytes(as_path(run_root) / IDS_FILE, json.dumps(ids, indent=2).encode())
    tracker = Tracker(backends)
    tracker.params(flatten(to_plain(cfg)))
    return tracker


def training_tracker(conf: dict, name: str, key: str, job_type: str) -> Tracker:
    """A training run under the pipeline run; `key` (the stage fingerprint) finds it again on resume;
    `job_type`: W&B's name for the kind of run (the training stage's)."""
    backends = []
    if "mlflow" in conf:
        parent = conf["ids"].get("mlflow")
        backends.append(_Mlflow(conf["mlflow"], None, run_name=name, tags={"mlflow.parentRunId": parent,
                                                                             "vlp.key": key}, find_key=key))
    if "wandb" in conf:
        group = conf["ids"].get("wandb")
        backends.append(_Wandb(conf["wandb"], f"{group}-{key[:12]}", name=name, group=group, job_type=job_type))
    return Tracker(backends)


def stage_figures(stage: str, manifest) -> dict[str, float]:
    """A committed stage's figures for the tracker: its accounting, and an evaluation's metrics."""
    t = manifest.totals
    figures = {f"{stage}/samples_in": t.samples_in, f"{stage}/samples_kept": t.samples_kept,
               f"{stage}/samples_dropped": sum(t.dropped.values()), f"{stage}/samples_failed": sum(t.failed.values())}
    for name, value in flatten(manifest.details.get("metrics") or {}).items():
        figures[f"{stage}/{name}"] = value
    return {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(data, prefix: str = "") -> dict:
    out = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = data
    return out


class _Mlflow:
    def __init__(self, conf: dict, run_id: str | None, run_name: str, tags: dict, find_key: str | None = None):
        # mlflow 3 keeps its file store in maintenance mode and refuses it unless asked; a local path is
        # what a run without a server has
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=conf["tracking_uri"])
        experiment = self.client.get_experiment_by_name(conf["experiment"])
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(conf["experiment"])
        if run_id is None and find_key is not None:
            found = self.client.search_runs([exp_id], filter_string=f"tags.`vlp.key` = '{find_key}'", max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags={k: v for k, v in tags.items() if v}).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params   # a resumed run: a param is set once
        items = [Param(k[:250], str(v)[:6000]) for k, v in values.items() if k[:250] not in logged]
        for i in range(0, len(items), 100):   # the API's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, conf: dict, run_id: str, name: str, group: str, job_type: str):
        import wandb

        Path(conf["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=conf["project"], entity=conf.get("entity"), mode=conf["mode"], dir=conf["dir"],
                              id=run_id, resume="allow", name=name, group=group, job_type=job_type,
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def params(self, values: dict) -> None:
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})   # W&B's own step must only grow; a resumed run logs again

    def artifact(self, path: Path) -> None:
        import wandb

        art = wandb.Artifact(path.name.replace("/", "-") or "report", type="report")
        art.add_dir(str(path)) if path.is_dir() else art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()
