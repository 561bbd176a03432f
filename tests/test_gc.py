"""`vlp gc` on a superseded/ folder holding more than the results vlp moved there: symlinks (to folders
and files outside the run, dangling) are removed as links and never followed, a stray file is named
as one and removed, a `superseded` that is itself a symlink goes as a link; nothing outside the run
directory is touched. No Ray: a run directory made by hand and the real CLI."""
from __future__ import annotations

from conftest import vlp
from pipeline.runs import RunDir


def _outside(tmp_path):
    """Data outside the run directory that links in superseded/ point to; returns {path: bytes}."""
    keep = tmp_path / "outside" / "keep"
    keep.mkdir(parents=True)
    (keep / "manifest.json").write_text("{}")   # looks like a complete result through a followed link
    (keep / "data.bin").write_bytes(b"x" * 5000)
    (tmp_path / "outside" / "alone.txt").write_text("keep me")
    return {p: p.read_bytes() for p in (tmp_path / "outside").rglob("*") if p.is_file()}


def _run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: gc\n")
    return run


def test_gc_removes_links_as_links_and_stray_files_and_touches_nothing_outside(tmp_path):
    before = _outside(tmp_path)
    run = _run(tmp_path)
    old = run / "superseded"
    result = old / "round-0-prefilter-0123456789abcdef0123-complete"
    result.mkdir(parents=True)
    (result / "manifest.json").write_text("{}")
    (result / "00000.tar").write_bytes(b"\0" * 2_000_000)
    (result / "inner-link").symlink_to(tmp_path / "outside" / "keep")   # inside a result: unlinked, not followed
    (old / "to-a-folder").symlink_to(tmp_path / "outside" / "keep")
    (old / "relative").symlink_to("../../outside/alone.txt")
    (old / "dangling").symlink_to(tmp_path / "nowhere")
    (old / "notes.txt").write_text("a stray file\n")

    listing = vlp("gc", str(run)).stdout
    assert f"would delete {old / 'to-a-folder'} (a symlink to {tmp_path / 'outside' / 'keep'}: the link only" in listing
    assert f"would delete {old / 'dangling'} (a symlink to {tmp_path / 'nowhere'}" in listing
    assert f"would delete {old / 'relative'} (a symlink to ../../outside/alone.txt" in listing
    assert f"would delete {old / 'notes.txt'} (13 bytes, a stray file: no result vlp moved there)" in listing
    assert f"would delete {result} (2.0 MB, complete)" in listing
    assert sorted(p.name for p in old.iterdir()) == ["dangling", "notes.txt", "relative",
                                                     "round-0-prefilter-0123456789abcdef0123-complete",
                                                     "to-a-folder"], "gc without --yes deletes nothing"
    listed = RunDir(run).superseded()   # as `vlp status` lists them
    assert {r["name"]: r["kind"] for r in listed} == {"dangling": "link", "notes.txt": "file", "relative": "link",
                                                      result.name: "result", "to-a-folder": "link"}

    done = vlp("gc", str(run), "--yes")
    assert "Traceback" not in done.stderr and done.stdout.count("deleting ") == 5
    assert list(old.iterdir()) == []
    assert {p: p.read_bytes() for p in (tmp_path / "outside").rglob("*") if p.is_file()} == before
    assert vlp("gc", str(run)).stdout.strip() == f"{run}: nothing superseded"


def test_gc_removes_a_symlinked_superseded_folder_as_a_link(tmp_path):
    before = _outside(tmp_path)
    run = _run(tmp_path)
    (run / "superseded").symlink_to(tmp_path / "outside")
    listing = vlp("gc", str(run)).stdout
    assert f"would delete {run / 'superseded'} (a symlink to {tmp_path / 'outside'}: the link only" in listing
    vlp("gc", str(run), "--yes")
    assert not (run / "superseded").exists() and not (run / "superseded").is_symlink()
    assert {p: p.read_bytes() for p in (tmp_path / "outside").rglob("*") if p.is_file()} == before
