"""The pipeline as a Ray Job: `vlp submit`, `vlp jobs`, `vlp logs`, `vlp stop`.

`vlp submit` writes the run's config into the run directory (which must be on storage the cluster's
nodes mount: the job reads it there and writes its shards there), ships this project as the job's
`working_dir`, and starts `python -m pipeline.cli run ...` on the head node. The job first proves it can
see the run directory (it removes a marker file the submitter wrote); until then `vlp submit` waits,
so a run directory the cluster cannot see is an error at submit time, not a silent failure later.

Auth: clusters started with `RAY_AUTH_MODE=token` require the token on every request; we send
`Authorization: Bearer <token>` from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token (Ray's own lookup order).
"""
from __future__ import annotations

import os
import shlex
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
# Not shipped with the job: environments, outputs, caches.
EXCLUDES = [".venv", "runs", ".git", ".gl", "bench/out", "**/__pycache__", "*.egg-info", ".pytest_cache",
            # nor secrets that happen to lie in a checkout: keys, certificates, tokens, credentials
            ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*", "id_ed25519*",
            "*.token", "auth_token", ".netrc", ".git-credentials", ".aws", ".ssh", ".ray", ".kube"]
MARKER_PREFIX = ".submitted-"

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
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES,
                   "env_vars": {"VLP_RAY_JOB": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                                "PYTHONWARNINGS": "ignore::UserWarning", **store_endpoints()}}
    job_id = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                          metadata={"vlp_run_dir": str(run.root), "vlp_name": name})
    _wait_until_visible(c, job_id, marker, wait_visible_s)
    return job_id, run.root


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
