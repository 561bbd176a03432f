"""CapFilt's part of the run's report (pipeline/report.py): the filter's scores against its threshold, a
few images per verdict with both captions, and each web sample's verdict for the fates per source. It
reads the newest committed round's decisions (`decisions/<shard>.parquet`)."""
from __future__ import annotations

import collections
import html
from pathlib import Path

from pipeline.data.shards import SHARD_DIGITS, read_shard
from pipeline.ledger import decisions_table, stage_decisions
from pipeline.reportsections import save_figure
from pipeline.runs import RunDir, StageDir
from pipeline.stage import ReportSection

SAMPLES_PER_VERDICT = 6
FATE_LABELS = ("web caption rejected", "web caption kept")


def fates(stage_dir: StageDir):
    """(key, fate: whether the filter kept its web caption) of every image CapFilt judged, as a table read
    from two columns of the decisions (no row becomes a Python object)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    decided = decisions_table(stage_dir.path, ["key", "web_kept"])
    kept, rejected = (pa.scalar(label, pa.string()) for label in reversed(FATE_LABELS))
    return pa.table({"key": decided["key"], "fate": pc.if_else(decided["web_kept"], kept, rejected)})


def section(page: ReportSection) -> str:
    committed = [d for d in page.dirs if d.manifest() is not None]
    if not committed:
        return ""
    newest = committed[-1]
    decided = stage_decisions(newest.path)
    if not decided:
        return ""
    manifest = newest.manifest()
    calibrated = manifest.config.get("rule") == "calibrated"
    what = "calibrated ITM + ITC score" if calibrated else "ITM match probability"
    threshold = float(manifest.details.get("threshold", manifest.config["threshold"]))
    score_chart(decided, page.truth, threshold, page.out / "scores.png", what)
    return (f"<h2>Filter scores (round {newest.round})</h2>"
            f"<p>The {what} the filter gave each web caption and each synthetic caption; the dashed "
            f'line is the threshold, <b id="threshold">{threshold:g}</b> (rule '
            f"<code>{html.escape(str(manifest.config.get('rule')))}</code>): a caption scoring at least "
            "this is kept.</p>"
            '<img src="scores.png" alt="histograms of filter scores">'
            f"<h2>Samples (round {newest.round})</h2>" + sample_grid(page.run, decided, page.truth, page.out))


def score_chart(decided: list[dict], truth: dict | None, threshold: float, path: Path,
                label: str = "ITM match probability") -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
    web = [d["web_score"] for d in decided]
    every = web + [d["synthetic_score"] for d in decided] + [threshold]
    low, high = min(every), max(every)  # ITM probabilities lie in 0..1, calibrated scores do not
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    if truth is not None:
        clean = [d["web_score"] for d in decided if d.get("url") in truth and not truth[d["url"]]["noisy"]]
        noisy = [d["web_score"] for d in decided if d.get("url") in truth and truth[d["url"]]["noisy"]]
        axes[0].hist([clean, noisy], bins=bins, stacked=True, label=["clean (truth)", "noisy (truth)"],
                     color=["#4a4", "#c44"])
        axes[0].legend(fontsize=7)
    else:
        axes[0].hist(web, bins=bins, color="#48c")
    axes[0].set_title("web captions")
    axes[1].hist([d["synthetic_score"] for d in decided], bins=bins, color="#a6c")
    axes[1].set_title("synthetic captions")
    for ax in axes:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
    save_figure(fig, path)


def sample_grid(run: RunDir, decided: list[dict], truth: dict | None, out: Path) -> str:
    """A few images per verdict, with both captions, their scores and the verdict."""
    by_verdict = collections.defaultdict(list)
    for d in decided:
        if len(by_verdict[d["verdict"]]) < SAMPLES_PER_VERDICT:
            by_verdict[d["verdict"]].append(d)
    wanted = {d["key"]: d for group in by_verdict.values() for d in group}
    images, source = {}, _web_shards(run)
    # a key starts with its shard's number (pipeline/data/shards.py): only the shards that hold a wanted key
    for name in sorted({key[:SHARD_DIGITS] + ".tar" for key in wanted}):
        if source is not None and source.shard_path(name).is_file():
            for sample in read_shard(source.shard_path(name)):
                if sample["__key__"] in wanted:
                    images[sample["__key__"]] = sample["jpg"]
    (out / "samples").mkdir()
    cards = []
    for verdict in ("both", "web", "synthetic", "dropped"):
        for d in by_verdict.get(verdict, []):
            if d["key"] not in images:
                continue
            (out / "samples" / f"{d['key']}.jpg").write_bytes(images[d["key"]])
            t = truth.get(d.get("url")) if truth else None
            truth_note = f"<br>truth: {html.escape(t['noise'])}" if t else ""
            cards.append(
                f'<div class="card"><img src="samples/{d["key"]}.jpg" alt="sample {d["key"]}">'
                f"<b>{verdict}</b>{truth_note}<br>web ({d['web_score']:.4g}, {_verdict(d['web_kept'])}): "
                f"{html.escape(d['web_caption'])}<br>synthetic ({d['synthetic_score']:.4g}, "
                f"{_verdict(d['synthetic_kept'])}): {html.escape(d['synthetic_caption'])}</div>")
    return f'<div class="grid">{"".join(cards)}</div>'


def _web_shards(run: RunDir) -> StageDir | None:
    """Round 0's committed web filter nearest the web (else the fetch itself): its shards hold every image
    CapFilt judged, in its input's bytes, whichever filters ran after it."""
    import stages

    committed = [n for n in stages.NAMES if stages.stage(n).curates_web and run.stage(n, 0).manifest() is not None]
    filters = [n for n in committed if not stages.stage(n).fetches]
    return run.stage((filters or committed)[0], 0) if committed else None


def _verdict(kept: bool) -> str:
    return '<span class="kept">kept</span>' if kept else '<span class="rejected">rejected</span>'


def figures(stage_dir: StageDir, manifest, truth) -> dict:
    """Its columns of the round-over-round table; on the toy web also the filter's precision and recall
    and the captioner's attribute accuracy against the truth (pipeline/toyweb/measures.py)."""
    from pipeline.toyweb.measures import captioner_quality, filter_quality

    t = manifest.totals
    row = {"capfilt_in": t.samples_in, "capfilt_kept": t.samples_kept, "pairs_out": manifest.details["pairs_out"],
           "synthetic_share": manifest.details["synthetic_share"]}
    known = truth()
    if known is not None:
        decided = stage_decisions(stage_dir.path)
        row["filter"] = filter_quality(decided, known)
        row["captioner"] = captioner_quality(decided, known)
    return row
