"""`vlp report RUN_DIR`: one static HTML page (PNG charts and sample images beside it, no server, no
scripts) that shows where every sample went and what CapFilt did, round over round: the run's dates,
code version, config and fingerprints, the accounting funnel, examples of every drop and failure reason
(a copy beside the sample or eval image it copies), download's failures by host, each source's fates,
the filter's scores and threshold, CapFilt's samples, retrieval per round, and links to the run's files
(pipeline/reportsections.py, pipeline/reportdata.py).

Written to `<run>/report/` as a whole: built in a temporary folder and renamed into place (on an object
store: put object by object). Its links are relative, so a copied or served run folder keeps them.
"""
from __future__ import annotations

import collections
import html
from pathlib import Path

import stages as stages_registry
from pipeline import graph, reportsections
from pipeline.reportsections import save_figure
from pipeline.benchmarks import format_benchmarks
from pipeline.fsutil import atomic_path
from pipeline.storage import remove_tree
from pipeline.ledger import stage_ledger
from pipeline.toyweb.measures import format_attributes, format_rounds, load_truth, rounds
from pipeline.status import status
from pipeline.runs import RunDir

def write_report(run_dir: str | Path) -> Path:
    """Write the report of a run; returns the path of its index.html."""
    run = RunDir(run_dir).require()
    final = run.root / "report"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        page = _build(run, tmp)
        (tmp / "index.html").write_text(page)
        if final.exists():
            remove_tree(final)
    return final / "index.html"


# Steps that run once after every round and commit no manifest: name in `stages:` -> what it does(run root).
AFTER_ROUNDS = {"report": write_report}


def _build(run: RunDir, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    stages = status(run.root)
    truth = load_truth(run)
    round_rows = rounds(run.root, truth)
    parts = [f"<h1>vlp run report: {html.escape(run.root.name)}</h1>", reportsections.metadata(run, stages)]

    parts.append("<h2>Accounting funnel</h2><p>Every sample that entered a stage is kept, dropped (with a "
                 "reason) or failed (with an error).</p>")
    _funnel_chart(stages, out / "funnel.png")
    parts.append('<img src="funnel.png" alt="accounting funnel per stage">')
    parts.append(_stage_table(stages))
    parts.append(reportsections.examples(run, stages, out))
    parts.append(reportsections.stage_sections(run, out, truth))

    fates, fate_order = _fates_by_source(run, truth)
    if fates:
        parts.append("<h2>Noise per source</h2><p>What became of each source's URLs, stage by stage"
                     + (" (and, on the toy web, how many of its captions are truly noisy)" if truth else "") + ".</p>")
        _source_chart(fates, fate_order, out / "sources.png")
        parts.append('<img src="sources.png" alt="fates per source">')
        parts.append(_source_table(fates, fate_order, truth))

    if round_rows:
        parts.append("<h2>Round over round</h2>")
        if any("tr_r1" in r for r in round_rows):
            _rounds_chart(round_rows, out / "rounds.png")
            parts.append('<img src="rounds.png" alt="retrieval per round">')
        parts.append(f"<pre>{html.escape(format_rounds(round_rows))}</pre>")
        benchmarks = format_benchmarks(round_rows)
        if benchmarks:
            parts.append("<h3>Standard evaluations</h3><p>Karpathy-split retrieval (TR/IR@1/5/10, five captions "
                         "per image) and zero-shot classification, per round.</p>"
                         f"<pre>{html.escape(benchmarks)}</pre>")
        by_attribute = format_attributes(round_rows)
        if by_attribute:
            parts.append("<p>Attribute by attribute (toy web): how many web captions with that one attribute "
                         "wrong the filter removed, and how often the captioner named it right.</p>"
                         f"<pre>{html.escape(by_attribute)}</pre>")
    parts.append(reportsections.files(run))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
             ".grid{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}.card{border:1px solid #ddd;padding:6px;"
             "font-size:12px}.card img{width:96px;height:96px;image-rendering:pixelated;float:left;margin-right:8px}"
             ".kept{color:#070}.rejected{color:#b00}.figures{display:flex;gap:6px}figure{margin:0 0 4px 0}"
             "figcaption{font-size:11px}.example img{float:none}.noimage{width:96px;height:96px;background:#eee}"
             ".meta th{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vlp report {html.escape(run.root.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _stage_table(stages: list[dict]) -> str:
    rows = ["<table><tr><th>round</th><th>stage</th><th>state</th><th>in</th><th>kept</th><th>dropped</th>"
            "<th>failed</th><th>reasons</th></tr>"]
    for s in stages:
        reasons = "; ".join(f"{k} {v}" for k, v in {**s["dropped_by_reason"], **s["failed_by_reason"]}.items())
        rows.append(f"<tr><td>{s['round']}</td><td>{s['stage']}</td><td>{s['state']}</td><td>{s['samples_in']}</td>"
                    f"<td>{s['samples_kept']}</td><td>{s['samples_dropped']}</td><td>{s['samples_failed']}</td>"
                    f"<td>{html.escape(reasons)}</td></tr>")
    return "".join(rows) + "</table>"


def _funnel_chart(stages: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    shown = [s for s in stages if graph.spec(s["stage"]).curates_web or graph.spec(s["stage"]).conserves]
    labels = [f"{s['stage']}\nround {s['round']}" for s in shown]
    fig, ax = plt.subplots(figsize=(7, 3))
    kept = [s["samples_kept"] for s in shown]
    dropped = [s["samples_dropped"] for s in shown]
    failed = [s["samples_failed"] for s in shown]
    ax.bar(labels, kept, label="kept", color="#4a4")
    ax.bar(labels, dropped, bottom=kept, label="dropped", color="#da4")
    ax.bar(labels, failed, bottom=[k + d for k, d in zip(kept, dropped)], label="failed", color="#c44")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _web_filters(run: RunDir) -> list[str]:
    """The stages after the fetch that filtered round 0's web data in this run, in graph order."""
    return [name for name in stages_registry.NAMES if graph.spec(name).curates_web and not graph.spec(name).fetches
            and run.stage(name, 0).manifest() is not None]


def _judges(run: RunDir) -> list[tuple[str, int]]:
    """(stage, its newest committed round) of every stage that gives web samples a verdict (Stage.fates)."""
    found = []
    for name in stages_registry.NAMES:
        done = [r for r in run.rounds() if graph.spec(name).fates and run.stage(name, r).manifest() is not None]
        if done:
            found.append((name, done[-1]))
    return found


def _fates_by_source(run: RunDir, truth: dict | None) -> tuple[dict[str, collections.Counter], list[str]]:
    """({source: Counter of fates}, the fates in order) over every URL of round 0's fetch, from the
    stages' ledgers (joined and counted in Arrow: no tar is read). A URL's fate is the first stage that
    did not keep it, else the verdict a judging stage (CapFilt) gave it, else kept."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fetched = [n for n in stages_registry.NAMES if graph.spec(n).fetches and run.stage(n, 0).manifest() is not None]
    if not fetched:
        return {}, []
    filters, judges = _web_filters(run), _judges(run)
    table = stage_ledger(run.stage(fetched[0], 0).path, ["key", "outcome", "source", "url"])
    for name in filters:
        ledger = stage_ledger(run.stage(name, 0).path, ["key", "outcome"]).rename_columns(["key", name])
        table = table.join(ledger, "key", join_type="left outer")
    labels = [f"{fetched[0]} failed"] + [f"{s} dropped" for s in filters]
    conditions = [pc.not_equal(table["outcome"], "kept")]
    conditions += [pc.and_(pc.is_valid(table[name]), pc.not_equal(table[name], "kept")) for name in filters]
    for name, round_ in judges:
        column = f"{name} verdict"
        verdicts = graph.spec(name).fates(run.stage(name, round_)).rename_columns(["key", column])
        table = table.join(verdicts, "key", join_type="left outer")
        for label in graph.spec(name).fate_labels:
            labels.append(label)
            conditions.append(pc.fill_null(pc.equal(table[column], label), False))
    labels.append("kept")
    conditions.append(pa.array([True] * table.num_rows))
    fate = pc.case_when(pc.make_struct(*conditions, field_names=[str(i) for i in range(len(conditions))]), *labels)
    noisy = pa.array([bool(truth and truth.get(u, {}).get("noisy")) for u in table["url"].to_pylist()]) \
        if truth else pa.nulls(table.num_rows, pa.bool_()).fill_null(False)
    counts = pa.table({"source": pc.fill_null(table["source"], "?"), "fate": fate, "noisy": noisy}) \
        .group_by(["source", "fate"]).aggregate([("fate", "count"), ("noisy", "sum")])
    fates: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in counts.to_pylist():
        fates[row["source"]][row["fate"]] += row["fate_count"]
        fates[row["source"]]["_noisy"] += row["noisy_sum"] or 0
    for source, counter in fates.items():
        counter["_urls"] = sum(v for k, v in counter.items() if not k.startswith("_"))
    return dict(sorted(fates.items())), labels


FILTER_COLOURS = ("#da4", "#e83", "#cb7", "#b95")   # one per web filter that dropped URLs
VERDICT_COLOURS = ("#a6c", "#4a4", "#6a9", "#9b5")  # one per verdict of a judging stage


def _fate_colours(fates: list[str]) -> list[str]:
    """Failed red, each filter's drops yellow to brown, the judges' verdicts, kept green."""
    filters = sum(f.endswith(" dropped") for f in fates)
    verdicts = len(fates) - filters - 2
    return ["#c44"] + [FILTER_COLOURS[i % len(FILTER_COLOURS)] for i in range(filters)] + \
        [VERDICT_COLOURS[i % len(VERDICT_COLOURS)] for i in range(verdicts)] + ["#8c8"]


def _source_chart(fates: dict, fate_order: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(fates)))
    names = list(fates)
    left = [0.0] * len(names)
    for fate, colour in zip(fate_order, _fate_colours(fate_order)):
        share = [fates[n][fate] / max(1, fates[n]["_urls"]) for n in names]
        ax.barh(names, share, left=left, label=fate, color=colour)
        left = [a + b for a, b in zip(left, share)]
    ax.set_xlabel("share of the source's URLs")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def _source_table(fates: dict, fate_order: list[str], truth: dict | None) -> str:
    head = "".join(f"<th>{f}</th>" for f in fate_order) + ("<th>noisy captions (truth)</th>" if truth else "")
    rows = [f"<table><tr><th>source</th><th>URLs</th>{head}</tr>"]
    for name, counter in fates.items():
        cells = "".join(f"<td>{counter[f]}</td>" for f in fate_order)
        if truth:
            cells += f"<td>{counter['_noisy']} ({counter['_noisy'] / max(1, counter['_urls']):.0%})</td>"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{counter['_urls']}</td>{cells}</tr>")
    return "".join(rows) + "</table>"


def _rounds_chart(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    done = [r for r in rows if "tr_r1" in r]
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for key, label in (("tr_r1", "TR@1"), ("ir_r1", "IR@1"), ("tr_r5", "TR@5"), ("ir_r5", "IR@5")):
        ax.plot([r["round"] for r in done], [r[key] for r in done], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_xticks([r["round"] for r in done])
    ax.set_ylabel("held-out retrieval")
    ax.legend(fontsize=7)
    save_figure(fig, path)
