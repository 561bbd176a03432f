"""The pipeline as a Ray Job: `vlp submit`, `vlp jobs`, `vlp logs`, `vlp stop`.

`vlp submit` writes the run's config into the run directory (which must be on storage the cluster's
nodes mount: the job reads it there and writes its shards there), ships this project as the job's
`working_dir`, and starts `python -m pipeline.cli run ...` on the head node. The job first proves it can
see the run directory (it removes a marker file the submitter wrote); until then `vlp submit` waits,
so a run directory the cluster cannot see is an error at submit time, not a silent failure later.

What is shipped is an allow-list (`package_working_dir`): the packages (pipeline/, stages/, cluster/),
configs/, pyproject.toml and the lock (requirements/), copied into a temporary folder that becomes the
job's working_dir; nothing else of the checkout goes (outputs, environments, notes, a stray credentials
file). Inside those folders, names that hold secrets (SECRETS: .env, .envrc, keys, tokens, cloud and
registry credentials, kubeconfig, rclone.conf, ...) are left out too, and so are symlinks (a link can
point anywhere: ~/.aws). A file the job needs beyond these is named, relative to the project root, in
the VLP_SUBMIT_INCLUDE variable (comma-separated files, folders or glob patterns, e.g.
`VLP_SUBMIT_INCLUDE=bench/train.py,extra/`); naming a secret there is an error, not a way to ship it.

Auth: clusters started with `RAY_AUTH_MODE=token` require the token on every request; we send
`Authorization: Bearer <token>` from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token (Ray's own lookup order).
"""
from __future__ import annotations

import fnmatch
import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from cluster.auth import auth_token
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_bytes
from pipeline.runlock import RunInUse, describe, holder
from pipeline.runs import check_run_dir
from pipeline.storage import as_path, is_remote, make_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What a job needs of the project (relative to ROOT): the packages, the configs, pyproject and the lock.
SHIPPED = ("pipeline", "stages", "cluster", "configs", "pyproject.toml", "requirements")
INCLUDE_ENV = "VLP_SUBMIT_INCLUDE"   # more files or folders to ship, comma-separated, relative to ROOT
# Names never shipped, at any depth (fnmatch on each file's and folder's name): secrets that happen to
# lie in a checkout (keys, certificates, tokens, cloud, registry and cluster credentials) ...
SECRETS = (".env", ".env.*", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
           "id_rsa*", "id_ecdsa*", "id_ed25519*", "id_dsa*", "*.token", "auth_token", ".vault-token",
           ".netrc", ".git-credentials", ".pypirc", ".npmrc", ".yarnrc*", ".s3cfg", ".boto", "rclone.conf",
           "kubeconfig*", "*.kubeconfig", "credentials", "credentials.json", "service-account*.json",
           "application_default_credentials.json", "secrets.yaml", "secrets.yml", "secrets.*.yaml",
           "secrets.*.yml", ".htpasswd", ".aws", ".ssh", ".ray", ".kube", ".docker", ".gnupg", ".azure",
           ".config")
# ... and outputs, environments and caches.
OUTPUTS = (".venv", "runs", ".git", ".gl", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
# Given to Ray as well (its gitignore-style excludes), a second guard over the staged folder.
EXCLUDES = [*OUTPUTS, "bench/out", "**/__pycache__", *SECRETS]
MARKER_PREFIX = ".submitted-"

log = logging.getLogger("vlp")
STORE_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def address_or_default(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None):
    """A JobSubmissionClient for `address`, with the auth token; clear errors for the usual mistakes."""
    from ray.job_submission import JobSubmissionClient

    address = address_or_default(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        c = JobSubmissionClient(address, headers=headers)
        c.list_jobs()  # the constructor does not check auth; this does
        return c
    except Exception as err:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError, ...: we say which case)
        raise InputError(_explain(address, token, err)) from None


def _explain(address: str, token: str | None, err: Exception) -> str:
    text = str(err)
    low = text.lower()
    if "401" in text or "403" in text or "unauthorized" in low or "forbidden" in low or "token" in low:
        which = "no token was found (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)" if token is None else \
            "the token was refused (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token is not this cluster's)"
        return f"Ray cluster at {address} requires authentication and {which}"
    if "connect" in low or "refused" in low or "timed out" in low or "resolve" in low or "unreachable" in low:
        return (f"cannot reach the Ray dashboard at {address} ({text.splitlines()[0][:160]}); is the cluster up, "
                "and is this the dashboard address (http://HEAD:8265)?")
    return f"Ray cluster at {address}: {text.splitlines()[0][:300] if text else type(err).__name__}"


def submit(address: str | None, *, config: str | None = None, overrides: tuple[str, ...] = (),
           run_dir: str | None = None, resume: str | None = None, retry_failed: bool = False,
           wait_visible_s: float = 120.0) -> tuple[str, Path]:
    """Submit a run (or the resumption of one) as a Ray Job; returns (job id, run directory)."""
    with tempfile.TemporaryDirectory(prefix="vlp-job-") as staging:
        # first: a VLP_SUBMIT_INCLUDE that names a secret or nothing fails before the run directory is touched
        package_working_dir(Path(staging))
        return _submit(staging, address, config=config, overrides=overrides, run_dir=run_dir, resume=resume,
                       retry_failed=retry_failed, wait_visible_s=wait_visible_s)


def _submit(working_dir: str, address: str | None, *, config: str | None, overrides: tuple[str, ...],
            run_dir: str | None, resume: str | None, retry_failed: bool, wait_visible_s: float) -> tuple[str, Path]:
    from pipeline.config import dump_config, load_config
    from pipeline.runner import default_run_dir
    from pipeline.runs import RunDir

    target = resume or run_dir
    if target is None:
        target = str(default_run_dir(load_config(config, overrides)))
    if (held := holder(check_run_dir(target))) is not None:   # refused before anything is written
        raise RunInUse(f"{target} is in use by {describe(held)}: one writer per run directory")
    c = client(address)
    if retry_failed and not resume:
        raise InputError("vlp submit: --retry-failed goes with --resume RUN_DIR")
    if resume:
        run = RunDir(check_run_dir(resume)).require()
        # Overrides go to the job's `vlp resume --set`; loading them here fails early on a bad one.
        args = ["resume", str(run.root)] + [a for o in overrides for a in ("--set", o)] + \
            (["--retry-failed"] if retry_failed else [])
        name = load_config(run.config_path, overrides).name
    else:
        cfg = load_config(config, overrides)
        run = RunDir(check_run_dir(str(run_dir or default_run_dir(cfg))))
        make_dir(run.root)
        atomic_write_bytes(run.config_path, dump_config(cfg).encode())
        args = ["run", str(run.config_path), "--run-dir", str(run.root)]
        name = cfg.name
    marker = run.root / f"{MARKER_PREFIX}{uuid.uuid4().hex[:12]}"
    atomic_write_bytes(marker, b"vlp submit\n")
    entrypoint = job_entrypoint(run.root, args, marker)
    # working_dir: the staged copy of what the job needs (package_working_dir), which submit_job zips and
    # uploads before it returns; EXCLUDES again, a second guard
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES,
                   "env_vars": {"VLP_RAY_JOB": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                                "PYTHONWARNINGS": "ignore::UserWarning", **store_endpoints()}}
    job_id = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                          metadata={"vlp_run_dir": str(run.root), "vlp_name": name})
    _wait_until_visible(c, job_id, marker, wait_visible_s)
    return job_id, run.root


def package_working_dir(dest: Path, root: Path = ROOT, include: str | None = None) -> list[str]:
    """Copy what a job needs of the project at `root` into `dest` (the job's working_dir): SHIPPED, and
    the paths `include` names (default: $VLP_SUBMIT_INCLUDE), less every SECRETS or OUTPUTS name at any
    depth and every symlink. Returns the files copied, relative to `root`; raises InputError for an
    `include` entry that is missing, outside `root`, or a secret."""
    include = os.environ.get(INCLUDE_ENV, "") if include is None else include
    wanted = [root / name for name in SHIPPED if (root / name).exists() or (root / name).is_symlink()]
    for entry in (e.strip() for e in include.split(",")):
        if entry:
            wanted += _included(root, entry)
    copied, left_out = [], []
    for top in wanted:
        # a symlink is not followed (rglob does not descend into one either): it may point anywhere
        for path in [top] if top.is_file() or top.is_symlink() else sorted(top.rglob("*")):
            rel = path.relative_to(root)
            if _matches(rel, OUTPUTS):
                continue
            if _matches(rel, SECRETS) or path.is_symlink():
                left_out.append(str(rel))
            elif path.is_file() and not (dest / rel).exists():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)
                copied.append(str(rel))
    if left_out:
        log.warning("vlp submit: not shipped with the job (secrets, symlinks): %s", ", ".join(left_out[:20])
                    + (f" and {len(left_out) - 20} more" if len(left_out) > 20 else ""))
    return copied


def _included(root: Path, entry: str) -> list[Path]:
    """The paths a VLP_SUBMIT_INCLUDE entry names (a file, a folder or a glob pattern, relative to `root`)."""
    if Path(entry).is_absolute() or ".." in Path(entry).parts:
        raise InputError(f"{INCLUDE_ENV}: {entry!r} is not a path inside the project {root}; name it relative to it")
    found = sorted(root.glob(entry)) if any(c in entry for c in "*?[") else \
        [root / entry] if (root / entry).exists() else []
    if not found:
        raise InputError(f"{INCLUDE_ENV}: {entry!r} is not in the project {root}")
    for path in found:
        if _matches(path.relative_to(root), SECRETS):
            raise InputError(f"{INCLUDE_ENV}: {entry!r} names {path.relative_to(root)}, which holds or is a credential "
                             "(cluster/jobs.py SECRETS); credentials are not shipped with a job: give the cluster's "
                             "nodes their own (an instance role, or variables set on the nodes)")
    return found


def _matches(rel: Path, patterns: tuple[str, ...]) -> bool:
    """Whether any part of `rel` (a path relative to the project) has a name `patterns` matches, in any case."""
    return any(fnmatch.fnmatchcase(part.lower(), pattern) for part in rel.parts for pattern in patterns)


def store_endpoints() -> dict[str, str]:
    """Where the submitter's object store is (endpoint, region: not secrets), for the job: an s3:// run
    directory on MinIO or R2 names nothing without its endpoint. Credentials are not sent: the nodes
    have their own (an instance role, or the variables set on them), as for any other job."""
    return {name: os.environ[name] for name in STORE_SETTINGS if os.environ.get(name)}


def job_entrypoint(run_root, args: list[str], marker) -> str:
    """The job's shell command. Ray may replace an unpacked working_dir while a job runs (when it sets up
    the same package for new workers): the driver's current directory vanished at the start of
    pretraining, and a module imported late (pipeline/plan.py, at Ray's start) was missing for a moment.
    So the driver imports from a private copy of the code, removed when the job ends, and works in the
    run directory. Every piece that comes from the user goes through shlex.quote: a run directory named
    `$(...)` is a name."""
    unseen = shlex.quote(f"vlp: error: the run directory {run_root} is not visible from the head node: put it "
                         "on storage every node mounts")
    # an object-store run directory is no place to stand in: the job works in the node's temporary folder
    workdir = 'cd "${TMPDIR:-/tmp}"' if is_remote(run_root) else f"cd {shlex.quote(str(run_root))}"
    return ('code=$(mktemp -d "${TMPDIR:-/tmp}/vlp-job-code-XXXXXX") && cp -r "$PWD"/. "$code"/ && '
            """trap 'rm -rf "$code"' EXIT; """
            f'export PYTHONPATH="$code${{PYTHONPATH:+:$PYTHONPATH}}"; {workdir} 2>/dev/null || '
            f"{{ printf '%s\\n' {unseen}; exit 2; }}; "
            + " ".join(["python", "-m", "pipeline.cli", *map(shlex.quote, args), "--submitted-marker",
                        shlex.quote(str(marker))]))


def _wait_until_visible(c, job_id: str, marker: Path, timeout: float) -> None:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not marker.exists():
            return  # the job saw the run directory and removed the marker
        status = c.get_job_status(job_id)
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
            marker.unlink(missing_ok=True)
            tail = [ln for ln in c.get_job_logs(job_id).splitlines() if ln.strip()][-3:]
            raise InputError(f"job {job_id} ended ({status.value}) before it started the run: "
                             + (" | ".join(tail) or "no output"))
        time.sleep(0.5)
    raise InputError(f"job {job_id} has not seen the run directory {marker.parent} after {timeout:.0f}s (still "
                     "pending, or the directory is not on storage the head node mounts); see `vlp logs "
                     f"{job_id}`, stop it with `vlp stop {job_id}`")


def claim_marker(marker: str) -> None:
    """In the job: prove the run directory is visible by removing the submitter's marker."""
    path = as_path(marker)
    if not path.is_file():
        raise InputError(f"the run directory {path.parent} is not visible from this node ({os.uname().nodename}): "
                         "put it on storage every node of the cluster mounts")
    path.unlink()


def list_jobs(address: str | None) -> list[dict]:
    rows = []
    for job in client(address).list_jobs():
        meta = job.metadata or {}
        rows.append({"job": job.submission_id or job.job_id, "status": job.status.value,
                     "start": job.start_time, "end": job.end_time, "name": meta.get("vlp_name", "-"),
                     "run_dir": meta.get("vlp_run_dir", "-")})
    return sorted(rows, key=lambda r: r["start"] or 0)


def format_jobs(rows: list[dict]) -> str:
    lines = [f"{'job':<28} {'status':<10} {'started':<19} {'name':<12} run directory"]
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start"] / 1000)) if r["start"] else "-"
        lines.append(f"{r['job']:<28} {r['status']:<10} {started:<19} {r['name']:<12} {r['run_dir']}")
    return "\n".join(lines)


def logs(address: str | None, job_id: str, follow: bool) -> None:
    import asyncio
    import sys

    c = client(address)
    _require_job(c, job_id)
    if not follow:
        sys.stdout.write(c.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    asyncio.run(tail())


def stop(address: str | None, job_id: str, timeout: float = 60.0) -> str:
    from ray.job_submission import JobStatus

    c = client(address)
    _require_job(c, job_id)
    c.stop_job(job_id)
    deadline = time.time() + timeout
    status = c.get_job_status(job_id)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(0.5)
        status = c.get_job_status(job_id)
    return status.value if isinstance(status, JobStatus) else str(status)


def _require_job(c, job_id: str) -> None:
    try:
        c.get_job_info(job_id)
    except Exception:  # noqa: BLE001 (Ray raises RuntimeError with the HTTP body)
        raise InputError(f"no job {job_id} on this cluster (see `vlp jobs`)") from None
