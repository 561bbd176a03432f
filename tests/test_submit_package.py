"""What `vlp submit` ships as the job's working_dir (cluster/jobs.py): an allow-list of what a job needs,
never a credential file lying in the checkout, and more only where VLP_SUBMIT_INCLUDE names it. No Ray:
the packaging runs on a project folder made by hand, and `submit` against a client that records what
Ray would have uploaded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import jobs
from conftest import ROOT
from pipeline.errors import InputError

# Credential files that used to ride along with a job (the review's list), then those the old deny-list had.
CREDENTIALS = [".envrc", ".s3cfg", ".boto", ".pypirc", ".npmrc", ".vault-token", "kubeconfig", "credentials.json",
               "service-account-prod.json", "service-account.json", "secrets.yaml", "secrets.yml", "rclone.conf",
               "KUBECONFIG", "Credentials.json",
               ".env", ".env.local", "id_rsa", "id_ed25519.pub", "server.pem", "tls.key", "auth_token", ".netrc",
               ".git-credentials", ".aws/credentials", ".ssh/config", ".kube/config", ".docker/config.json"]
# What a job needs: the packages, the configs, pyproject and the lock.
NEEDED = ["pipeline/__init__.py", "pipeline/cli.py", "pipeline/hf_template/modeling_vlp.py", "stages/__init__.py",
          "stages/download/stage.py", "cluster/__init__.py", "cluster/jobs.py", "configs/tiny.yaml", "pyproject.toml",
          "requirements/cpu.txt"]


def _project(root: Path, outside: Path) -> None:
    for rel in NEEDED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    for rel in CREDENTIALS:   # at the top of the checkout ...
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("SECRET\n")
    for folder in ("configs", "pipeline", "stages/sub"):   # ... and inside the folders that are shipped
        for rel in (".envrc", "credentials.json", "secrets.yaml", "rclone.conf", "service-account-ci.json", ".s3cfg"):
            (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / folder / rel).write_text("SECRET\n")
    (outside / "credentials").parent.mkdir(parents=True, exist_ok=True)
    (outside / "credentials").write_text("SECRET\n")
    (root / "configs" / "aws").symlink_to(outside)                              # a link to a folder elsewhere
    (root / "configs" / "innocent.yaml").symlink_to(outside / "credentials")    # a link with an innocent name
    for rel in ("README.md", "notes.txt", "bench/train.py", "runs/r/config.yaml", ".venv/bin/python",
                ".git/config", "pipeline/__pycache__/cli.cpython-311.pyc", "vlp.egg-info/PKG-INFO"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def test_the_job_gets_what_it_needs_and_no_credential_file(tmp_path):
    root, dest = tmp_path / "project", tmp_path / "staged"
    _project(root, tmp_path / "home" / ".aws")
    dest.mkdir()
    copied = jobs.package_working_dir(dest, root, include="")
    assert _files(dest) == set(NEEDED) == set(copied)
    assert not any("SECRET" in (dest / f).read_text() for f in _files(dest))


def test_a_file_outside_the_allow_list_is_shipped_when_named(tmp_path):
    root, dest = tmp_path / "project", tmp_path / "staged"
    _project(root, tmp_path / "home" / ".aws")
    dest.mkdir()
    jobs.package_working_dir(dest, root, include="bench/train.py, README.md,stages/sub")
    assert _files(dest) == set(NEEDED) | {"bench/train.py", "README.md"}   # stages/sub: only secrets, left out
    for named in (".envrc", "configs/credentials.json", "kubeconfig", "service-account-prod.json", ".aws",
                  "configs/secrets.y*ml"):
        with pytest.raises(InputError, match="credential"):
            jobs.package_working_dir(tmp_path / "x", root, include=named)
    for named, message in (("../elsewhere", "not a path inside the project"), ("/etc/passwd", "not a path inside"),
                           ("nope.txt", "'nope.txt' is not in the project")):
        with pytest.raises(InputError, match=message):
            jobs.package_working_dir(tmp_path / "x", root, include=named)


def test_this_projects_package_imports_and_holds_every_module(tmp_path, monkeypatch):
    monkeypatch.delenv(jobs.INCLUDE_ENV, raising=False)
    jobs.package_working_dir(tmp_path)
    modules = {str(p.relative_to(ROOT)) for top in ("pipeline", "stages", "cluster") for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= _files(tmp_path)
    assert {"pyproject.toml", "requirements/cpu.txt", "configs/tiny.yaml"} <= _files(tmp_path)
    code = "import pipeline.cli, pipeline.runner, cluster.jobs, stages"   # as the job's driver imports them
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


class _RecordingClient:
    """Stands in for Ray's JobSubmissionClient: records the files of the working_dir when the job is
    submitted (as Ray zips them then), and "sees" the run directory at once."""

    def __init__(self):
        self.shipped = None

    def submit_job(self, entrypoint, runtime_env, metadata):
        self.shipped = _files(Path(runtime_env["working_dir"]))
        self.runtime_env = runtime_env
        for marker in Path(metadata["vlp_run_dir"]).glob(f"{jobs.MARKER_PREFIX}*"):
            marker.unlink()
        return "raysubmit_test"


def test_submit_uploads_the_staged_folder_not_the_checkout(tmp_path, monkeypatch):
    root = tmp_path / "project"
    _project(root, tmp_path / "home" / ".aws")
    recorder = _RecordingClient()
    monkeypatch.setattr(jobs, "ROOT", root)
    monkeypatch.setattr(jobs, "package_working_dir",
                        lambda dest, root=root, include=None, real=jobs.package_working_dir: real(dest, root, include))
    monkeypatch.setattr(jobs, "client", lambda address: recorder)
    monkeypatch.setenv(jobs.INCLUDE_ENV, "README.md")
    job, run = jobs.submit(None, config=str(ROOT / "configs" / "tiny.yaml"), run_dir=str(tmp_path / "run"))
    assert job == "raysubmit_test" and (run / "config.yaml").is_file()
    assert recorder.shipped == set(NEEDED) | {"README.md"}
    assert not Path(recorder.runtime_env["working_dir"]).exists(), "the staged copy is removed after the upload"
    monkeypatch.setenv(jobs.INCLUDE_ENV, ".s3cfg")   # refused before the run directory is touched
    with pytest.raises(InputError, match="credential"):
        jobs.submit(None, config=str(ROOT / "configs" / "tiny.yaml"), run_dir=str(tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()
