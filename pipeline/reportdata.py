"""What `vlp report` reads beyond the manifests, each read bounded so that a run of 10^6 samples costs
about what a run of 10^3 does:

* examples of every drop and failure reason: the first few rows per reason in shard order, from a
  stage's ledgers, read one ledger at a time until every reason the stage counted has its examples;
  their images and captions from round 0's fetch (the stage that downloads) (only the wanted members, each shard read up to its
  last wanted key: shards are sorted by key), the kept sample a copy copies (`keeper`), and the eval
  image a contaminated one copies (`benchmark`, `item`: one image file, or one eval tar read up to it);
* the fetch's failures by host: one pass over three columns of its ledgers, batch by batch, in Arrow;
* the run's metadata: dates, code version, fingerprints (manifests; git for the source's commit);
* the files the report links: one listing per folder, so a link names a file that exists.

Paths are local or object-store paths alike (pipeline/storage.py).
"""
from __future__ import annotations

import collections
import contextlib
import io
import subprocess
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.data import samplejson
from pipeline.data.shards import SHARD_DIGITS, STREAM_BLOCK
from pipeline.ledger import DECISIONS, SCHEMA
from pipeline.runs import MANIFEST, STATS_SUFFIX, RunDir, StageDir
from pipeline.stage import declared, having
from pipeline.storage import arrow, as_path, children, is_remote, relative_to

EXAMPLES_PER_REASON = 3
EXAMPLE_SHARDS = 16               # the ledgers searched for examples, from the first shard on
THUMB_SIDE = 128
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]/?#]*\]|[^:/?#]*)"
SHARD_LINKS = 100                 # per stage; the manifest lists them all
MODEL_FILES = 40


# --- examples -------------------------------------------------------------------------------------

def ledger_files(folder) -> list:
    """The ledgers (`NNNNN.parquet`) of a stage folder's committed shards (those with a stats file), in
    shard order, from one listing."""
    entries = children(as_path(folder))
    committed = {p.name[:-len(STATS_SUFFIX)] for p in entries if p.name.endswith(STATS_SUFFIX)}
    return sorted((p for p in entries if p.name.endswith(".parquet") and p.name.count(".") == 1
                   and p.name.split(".")[0] in committed), key=lambda p: p.name)


def ledger_examples(folder, reasons, per_reason: int = EXAMPLES_PER_REASON) -> dict[str, list[dict]]:
    """{reason: the first `per_reason` ledger rows with that reason}, for `reasons` (those the stage
    counted): ledgers are read in shard order, one at a time, until every reason has its rows or
    EXAMPLE_SHARDS ledgers are read (a reason rarer than that may have no example)."""
    wanted = dict.fromkeys(reasons, per_reason)
    found: dict[str, list[dict]] = {reason: [] for reason in wanted}
    for file in ledger_files(folder)[:EXAMPLE_SHARDS]:
        open_reasons = [reason for reason, n in wanted.items() if n]
        if not open_reasons:
            break
        name, fs = arrow(file)
        table = ds.dataset(name, schema=SCHEMA, format="parquet", filesystem=fs).to_table(
            filter=ds.field("reason").isin(open_reasons))
        for row in table.to_pylist():
            if wanted.get(row["reason"]):
                found[row["reason"]].append(row)
                wanted[row["reason"]] -= 1
    return found


def read_members(shard, keys, sorted_by_key: bool = True) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of the samples `keys` of a tar shard. Stops at the first member past the last
    wanted key (our shards are written sorted by key), or, for tars of others, once every key is read.
    A shard that is cut or gone gives what was read before (the report shows an example without it)."""
    shard, keys = as_path(shard), set(keys)
    if not keys or not shard.is_file():
        return {}
    last, found = max(keys), {}
    with contextlib.suppress(tarfile.TarError, OSError), contextlib.ExitStack() as stack:
        if is_remote(shard):   # one GET, read as a stream (skipping a member reads it)
            f = stack.enter_context(shard.open("rb", block_size=STREAM_BLOCK))
            tar = stack.enter_context(tarfile.open(fileobj=f, mode="r|"))
        else:                  # seeks over the members it does not read
            tar = stack.enter_context(tarfile.open(shard, "r"))
        for member in tar:
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            if key in keys and member.isfile():
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
            elif (sorted_by_key and key > last) or len(found) == len(keys):
                break
    return found


def image_of(members: dict[str, bytes] | None) -> bytes | None:
    return next((members[ext] for ext in IMAGE_MEMBERS if members and ext in members), None)


def thumbnail(data: bytes | None, path: Path) -> bool:
    """Write a small JPEG of image bytes at `path`; False if they do not decode."""
    from PIL import Image

    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
            small = img.convert("RGB")
            small.thumbnail((THUMB_SIDE, THUMB_SIDE))
            small.save(path, "JPEG", quality=85)
        return True
    except Exception:  # noqa: BLE001 (an unreadable image is shown as such, it does not stop the report)
        return False


def attach_images(run: RunDir, examples: dict[str, list[dict]], eval_sources: dict, out: Path) -> None:
    """Give a web filter's example rows their picture and caption (`image`, `caption`), a copy its keeper's
    (`keeper_image`, `keeper_url`) and a contaminated one its eval twin (`twin_image`, found in the
    `eval_sources` the stage's manifest records); images are thumbnails under `out/examples/`, named
    relative to `out`. Pictures come from round 0's fetch, which holds every web sample."""
    rows = [row for group in examples.values() for row in group]
    keys = {row["key"] for row in rows} | {row["keeper"] for row in rows if row.get("keeper")}
    fetched = run.stage(having("fetches")[0], 0)
    samples: dict[str, dict[str, bytes]] = {}
    for name in sorted({key[:SHARD_DIGITS] + ".tar" for key in keys}):   # a key starts with its shard's number
        samples |= read_members(fetched.shard_path(name), {k for k in keys if k.startswith(name[:SHARD_DIGITS])})
    twins = eval_images(eval_sources, {(row["benchmark"], row["item"]) for row in rows if row.get("benchmark")})
    twin_names = {twin: f"eval-{i}" for i, twin in enumerate(sorted(twins))}
    folder = out / "examples"
    folder.mkdir(exist_ok=True)

    def picture(name: str, data: bytes | None) -> str | None:
        return f"examples/{name}.jpg" if thumbnail(data, folder / f"{name}.jpg") else None

    for row in rows:
        sample = samples.get(row["key"], {})
        row["image"] = picture(row["key"], image_of(sample))
        row["caption"] = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
        if row.get("keeper"):
            keeper = samples.get(row["keeper"], {})
            row["keeper_image"] = picture(row["keeper"], image_of(keeper))
            row["keeper_url"] = samplejson.parse(keeper.get("json")).get("url")
        if row.get("benchmark"):
            twin = (row["benchmark"], row["item"])
            row["twin_image"] = picture(twin_names[twin], twins[twin]) if twin in twins else None


def eval_images(sources: dict, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """{(benchmark, item): image bytes} of the eval images a stage's ledger names, found in the sources its
    manifest records ({name: eval shards (`shards`) or a benchmark's settings}; stages/prefilter/stage.py):
    `<tar>/<key>` in the eval shards or a webdataset benchmark, else the image's path under a benchmark's
    images. An image no longer where the sources say is left out."""
    found, tar_keys = {}, collections.defaultdict(set)
    for bench_name, item in wanted:
        tar_name, _, key = item.rpartition("/")
        bench = sources.get(bench_name)
        if bench is None:
            continue
        if "shards" in bench:
            tar = next((p for p in bench["shards"] if as_path(p).name == tar_name), None)
            if tar is not None:
                tar_keys[tar].add(key)
            continue
        if bench["format"] == "wds":
            tar_keys[str(as_path(bench["path"]) / (bench.get("split") or "test") / tar_name)].add(key)
            continue
        root = bench.get("images") if bench["format"] == "karpathy" else bench["path"]
        file = as_path(root) / item if root else as_path(bench["path"]).parent / item
        if file.is_file():
            found[(bench_name, item)] = file.read_bytes()
    for tar, keys in tar_keys.items():
        for key, members in read_members(tar, keys, sorted_by_key=False).items():
            for bench_name, item in wanted:
                if item == f"{as_path(tar).name}/{key}" and image_of(members) is not None:
                    found[(bench_name, item)] = image_of(members)
    return found


def failures_by_host(folder) -> list[dict]:
    """[{host, urls, failed, reasons: Counter}] over every URL of a download folder's ledgers, most
    failures first: three columns read batch by batch, the host taken from the URL in Arrow."""
    files = ledger_files(folder)
    if not files:
        return []
    dataset = ds.dataset([arrow(f)[0] for f in files], schema=SCHEMA, format="parquet", filesystem=arrow(files[0])[1])
    urls, failed = collections.Counter(), collections.defaultdict(collections.Counter)
    for batch in dataset.to_batches(columns=["outcome", "reason", "url"]):
        host = pc.struct_field(pc.extract_regex(pc.fill_null(batch.column("url"), ""), HOST), [0])
        host = pc.replace_substring_regex(pc.utf8_lower(pc.fill_null(host, "")), r"^\[|\]$", "")
        table = pa.table({"host": host, "outcome": batch.column("outcome"), "reason": batch.column("reason")})
        for row in table.group_by(["host", "outcome", "reason"]).aggregate([("outcome", "count")]).to_pylist():
            urls[row["host"]] += row["outcome_count"]
            if row["outcome"] == "failed":
                failed[row["host"]][row["reason"]] += row["outcome_count"]
    rows = [{"host": h, "urls": n, "failed": sum(failed[h].values()), "reasons": failed[h]} for h, n in urls.items()]
    return sorted(rows, key=lambda r: (-r["failed"], r["host"]))


# --- metadata -------------------------------------------------------------------------------------

def source_commit() -> str | None:
    """The git commit of the vlp source this process runs (`-dirty` if tracked files differ from it), or
    None where it is no git checkout (an installed wheel, a Ray job's working_dir without .git)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:   # e.g. a venv inside some other repository
        return None
    head = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head and head + ("-dirty" if dirty else "")


def stage_dirs(run: RunDir) -> list[StageDir]:
    """The run's stage folders, round by round, each round's in the order its stages run."""
    from pipeline.graph import registry

    names = [s.name for s in registry()]
    return sorted(run.stage_dirs(), key=lambda sd: (sd.round, names.index(sd.stage) if sd.stage in names else len(names),
                                                     sd.stage))


def stage_records(run: RunDir) -> list[dict]:
    """Per stage folder: round, stage, fingerprint, code version, recorded commit, started, finished,
    inputs (its manifest; a stage not committed has its fingerprint marker only)."""
    rows = []
    for sd in stage_dirs(run):
        m = sd.manifest()
        rows.append({"round": sd.round, "stage": sd.stage, "fingerprint": m.fingerprint if m else sd.fingerprint(),
                     "code_version": m.code_version if m else None,
                     "git_commit": m.details.get("git_commit") if m else None,
                     "started": m.started if m else None, "finished": m.finished if m else None,
                     "inputs": list(m.inputs) if m else [], "committed": m is not None})
    return rows


# --- links ----------------------------------------------------------------------------------------


def run_files(run: RunDir) -> tuple[list[str], list[dict]]:
    """What the report links, as paths relative to the run directory, each from a listing (so each is
    there): the run's own files, then per stage folder its manifest, shards (tar and ledger), CapFilt's
    decisions, pretrain's TensorBoard events and metrics, and the models (an export, CapFilt's copies)."""
    top = [p.name for p in children(run.root) if p.name in ("config.yaml", "tracking.json") and p.is_file()]
    if (run.root / "toyweb" / "truth.parquet").is_file():
        top.append("toyweb/truth.parquet")
    stages = []
    for sd in stage_dirs(run):
        names = {p.name for p in children(sd.path)}
        prefix = relative_to(sd.path, run.root) or f"round-{sd.round}/{sd.stage}"
        shards = _shard_names(sd, names)
        decisions = {p.name for p in children(sd.path / DECISIONS)} if DECISIONS in names else set()
        row = {"round": sd.round, "stage": sd.stage, "folder": prefix, "shards_total": len(shards),
               "manifest": f"{prefix}/{MANIFEST}" if MANIFEST in names else None, "shards": [],
               "tensorboard": [], "metrics": f"{prefix}/metrics.jsonl" if "metrics.jsonl" in names else None,
               "models": {}}
        for shard in shards[:SHARD_LINKS]:
            stem = shard.split(".")[0]
            row["shards"].append({"shard": shard, "tar": f"{prefix}/{shard}" if shard in names else None,
                                  "ledger": f"{prefix}/{stem}.parquet" if f"{stem}.parquet" in names else None,
                                  "decisions": f"{prefix}/{DECISIONS}/{stem}.parquet"
                                  if f"{stem}.parquet" in decisions else None})
        if "tensorboard" in names:
            row["tensorboard"] = sorted(f"{prefix}/tensorboard/{p.name}" for p in children(sd.path / "tensorboard")
                                        if p.is_file())
        for model in declared(sd.stage, "models", ()):
            if model in names:
                files = sorted(p for p in (sd.path / model).rglob("*") if p.is_file())[:MODEL_FILES]
                row["models"][model] = [f"{prefix}/{relative_to(p, sd.path)}" for p in files]
        stages.append(row)
    return top, stages


def _shard_names(sd: StageDir, names: set[str]) -> list[str]:
    """The shards a stage committed: its manifest's, else (a stage that stopped) those with a stats file."""
    manifest = sd.manifest() if MANIFEST in names else None
    if manifest is not None:
        return [s["shard"] for s in manifest.shards]
    return sorted(n[:-len(STATS_SUFFIX)] + ".tar" for n in names if n.endswith(STATS_SUFFIX))
