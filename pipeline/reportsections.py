"""The report's sections (pipeline/report.py puts them in the page): the run's metadata, examples of every
drop and failure reason, each stage's own section (Stage.report), and links to the run's files. The data
come from pipeline/reportdata.py; this module only writes HTML. Links are relative to `<run>/report/`."""
from __future__ import annotations

import datetime
import html
from pathlib import Path
from urllib.parse import quote

from pipeline import graph, reportdata
from pipeline.manifest import code_version
from pipeline.runs import RunDir
from pipeline.stage import ReportSection

_NONE = f"(none in the first {reportdata.EXAMPLE_SHARDS} shards)"
CAPTION_CHARS = 160


def _link(rel: str, text: str | None = None) -> str:
    """A link to `rel` (a path relative to the run directory) from the report's folder."""
    return f'<a href="../{quote(rel)}">{html.escape(text or rel.rsplit("/", 1)[-1])}</a>'


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def metadata(run: RunDir, stages: list[dict]) -> str:
    """When the run ran, which code, which config, and every stage's fingerprint."""
    records = reportdata.stage_records(run)
    state = {(s["stage"], s["round"]): s["state"] for s in stages if not s.get("rebuild")}
    done = [r for r in records if r["committed"]]
    started = min((r["started"] for r in done), default=None)
    finished = max((r["finished"] for r in done), default=None)
    versions = sorted({r["code_version"] for r in done if r["code_version"]})
    version = f"vlp {html.escape(', '.join(versions))} (the manifests')" if versions else \
        f"vlp {html.escape(code_version())} (writing this report; no stage committed)"
    recorded = sorted({r["git_commit"] for r in done if r["git_commit"]})
    here = None if recorded else reportdata.source_commit()
    if recorded:
        commit = f"git commit <code>{html.escape(', '.join(recorded))}</code> (recorded by the run)"
    elif here:
        commit = f"git commit <code>{html.escape(here)}</code> (of the source writing this report; the run recorded none)"
    else:
        commit = "git commit unknown (the run recorded none, and the source writing this report is no git checkout)"
    config = run.config_path
    rows = [
        f"<tr><th>run directory</th><td><code>{html.escape(str(run.root))}</code></td></tr>",
        f'<tr><th>dates</th><td id="run-dates">first stage started {_when(started)}, last finished {_when(finished)}; '
        f"report written {_when(datetime.datetime.now(datetime.timezone.utc).timestamp())}</td></tr>",
        f'<tr><th>code</th><td id="code-version">{version}; {commit}</td></tr>',
        f'<tr><th>config</th><td id="config">{_link("config.yaml")} (the resolved config of the last <code>vlp run'
        f"</code>)<details><summary>show</summary><pre>{html.escape(config.read_text())}</pre></details></td></tr>",
    ]
    table = ['<table id="fingerprints"><tr><th>round</th><th>stage</th><th>state</th><th>fingerprint</th>'
             "<th>vlp</th><th>inputs</th><th>started</th><th>finished</th></tr>"]
    for r in records:
        table.append(f'<tr data-stage="{r["stage"]}" data-round="{r["round"]}"><td>{r["round"]}</td><td>{r["stage"]}</td>'
                     f'<td>{state.get((r["stage"], r["round"]), "-")}</td><td><code>{html.escape(r["fingerprint"] or "-")}'
                     f'</code></td><td>{html.escape(r["code_version"] or "-")}</td><td><code>'
                     f'{html.escape(" ".join(r["inputs"]))}</code></td><td>{_when(r["started"])}</td>'
                     f"<td>{_when(r['finished'])}</td></tr>")
    return ('<h2>Run</h2><table class="meta">' + "".join(rows) + "</table>"
            "<p>Fingerprints: a stage's settings and inputs (its upstream results); the same fingerprint is the "
            "same result.</p>" + "".join(table) + "</table>")


def examples(run: RunDir, stages: list[dict], out: Path) -> str:
    """A few samples of every reason a stage dropped or failed samples for: download's as URLs with their
    error, prefilter's and the other web filters' with their picture and caption, a copy beside the sample it copies (near or exact
    duplicate: its keeper; contaminated: the eval image)."""
    parts = []
    for s in stages:
        if s.get("rebuild") or not graph.spec(s["stage"]).curates_web:
            continue
        outcome = {r: "dropped" for r in s["dropped_by_reason"]} | {r: "failed" for r in s["failed_by_reason"]}
        counts = {**s["dropped_by_reason"], **s["failed_by_reason"]}
        if not outcome:
            continue
        sd = run.stage(s["stage"], s["round"])
        found = reportdata.ledger_examples(sd.path, sorted(outcome))
        parts.append(f"<h3>{s['stage']} (round {s['round']})</h3>")
        if graph.spec(s["stage"]).fetches:   # download: a URL and its error, no picture
            parts.append(_url_examples(found, outcome, counts, s["samples_in"]))
        else:
            reportdata.attach_images(run, found, sd.manifest().details.get("eval_sources") or {}, out)
            parts.append(_sample_examples(found, outcome, counts))
    if not parts:
        return ""
    return ("<h2>Drops and failures, by example</h2><p>For every reason a stage dropped or failed samples for, "
            f"the first {reportdata.EXAMPLES_PER_REASON} in shard order, from the first {reportdata.EXAMPLE_SHARDS} "
            "shards (the ledgers hold them all). CapFilt's rejections are in its sample grid.</p>" + "".join(parts))


def _url_examples(found: dict, outcome: dict, counts: dict, samples_in: int) -> str:
    rows = ['<table class="reasons" id="download-reasons"><tr><th>outcome</th><th>reason</th><th>URLs</th>'
            "<th>share</th><th>examples: URL (list, row) and error</th></tr>"]
    for reason in sorted(outcome, key=lambda r: (outcome[r], -counts[r], r)):
        cells = "<br>".join(
            f"<code>{html.escape(e['url'] or '(no URL)')}</code> ({html.escape(e['source'] or '?')}, row "
            f"{e['source_row'] if e['source_row'] is not None else '?'})"
            + (f": {html.escape(e['error'])}" if e.get("error") else "") for e in found.get(reason, [])) or _NONE
        rows.append(f'<tr data-reason="{html.escape(reason)}"><td>{outcome[reason]}</td><td>{html.escape(reason)}</td>'
                    f"<td>{counts[reason]}</td><td>{counts[reason] / max(1, samples_in):.1%}</td><td>{cells}</td></tr>")
    return "".join(rows) + "</table>"


def _sample_examples(found: dict, outcome: dict, counts: dict) -> str:
    parts = []
    for reason in sorted(outcome, key=lambda r: (outcome[r], -counts[r], r)):
        cards = [_card(e) for e in found.get(reason, [])] or [_NONE]
        parts.append(f"<h4>{html.escape(reason)} ({outcome[reason]}: {counts[reason]})</h4>"
                     f'<div class="grid examples">{"".join(cards)}</div>')
    return "".join(parts)


def _figure(src: str | None, role: str, label: str) -> str:
    img = f'<img class="{role}" src="{src}" alt="{label}">' if src else '<div class="noimage">no image</div>'
    return f"<figure>{img}<figcaption>{label}</figcaption></figure>"


def _card(e: dict) -> str:
    attrs = {"reason": e["reason"], "key": e["key"], "keeper": e.get("keeper"), "benchmark": e.get("benchmark"),
             "item": e.get("item"), "distance": e.get("distance")}
    data = "".join(f' data-{k}="{html.escape(str(v))}"' for k, v in attrs.items() if v is not None)
    figures = [_figure(e.get("image"), "sample", f"{html.escape(e['key'])} ({html.escape(e['outcome'])})")]
    if e.get("keeper"):
        figures.append(_figure(e.get("keeper_image"), "keeper", f"its keeper {html.escape(e['keeper'])}"))
    if e.get("benchmark"):
        figures.append(_figure(e.get("twin_image"), "twin",
                               f"eval twin: {html.escape(e['benchmark'])} {html.escape(e['item'] or '')}"))
    notes = []
    if e.get("caption") is not None:
        caption = e["caption"] if len(e["caption"]) <= CAPTION_CHARS else e["caption"][:CAPTION_CHARS] + "…"
        notes.append(f"caption: “{html.escape(caption)}”" if caption.strip() else "caption: (empty)")
    if e.get("distance") is not None:
        notes.append(f"distance {e['distance']:.3f}")
    if e.get("error"):
        notes.append(f"error: {html.escape(e['error'])}")
    notes.append(f"<code>{html.escape(e.get('url') or '(no URL)')}</code> ({html.escape(e.get('source') or '?')}, row "
                 f"{e['source_row'] if e.get('source_row') is not None else '?'})")
    if e.get("keeper_url"):
        notes.append(f"keeper: <code>{html.escape(e['keeper_url'])}</code>")
    return f'<div class="card example"{data}><div class="figures">{"".join(figures)}</div>{"<br>".join(notes)}</div>'


def stage_sections(run: RunDir, out: Path, truth: dict | None) -> str:
    """Each stage's own section (Stage.report: download's failures by host, the curation operators' rules
    and counts, CapFilt's scores and samples, the training curves), in graph order, given its folders
    (committed or stopped: a stopped download still shows its failures)."""
    import stages

    parts = []
    for name in stages.NAMES:
        spec = graph.spec(name)
        if spec.report is None:
            continue
        dirs = tuple(run.stage(name, r) for r in run.rounds() if run.stage(name, r).path.is_dir())
        if dirs:
            parts.append(spec.report(ReportSection(run, dirs, out, truth, _link)))
    return "".join(parts)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as the report's PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def files(run: RunDir) -> str:
    """Links to the run's config, every stage's manifest, shards and ledgers, TensorBoard and the models."""
    top, stages = reportdata.run_files(run)
    rows = ['<table id="files"><tr><th>round</th><th>stage</th><th>manifest</th><th>shards: tar, ledger'
            "</th><th>TensorBoard, metrics</th><th>models</th></tr>"]
    for s in stages:
        shards = "<br>".join(" ".join(_link(rel, text) for rel, text in
                                      ((sh["tar"], sh["shard"]), (sh["ledger"], "ledger"), (sh["decisions"], "decisions"))
                                      if rel) for sh in s["shards"])
        if s["shards_total"] > len(s["shards"]):
            shards += f"<br>and {s['shards_total'] - len(s['shards'])} more (the manifest lists them all)"
        board = " ".join(_link(rel) for rel in s["tensorboard"])
        if s["tensorboard"]:
            board += f"<br>in the run directory: <code>tensorboard --logdir {html.escape(s['folder'])}/tensorboard</code>"
        if s["metrics"]:
            board += "<br>" + _link(s["metrics"])
        models = "<br>".join(f"{name}/: " + " ".join(_link(rel, rel.split(f"/{name}/", 1)[-1]) for rel in rels)
                             for name, rels in s["models"].items())
        rows.append(f'<tr data-stage="{s["stage"]}" data-round="{s["round"]}"><td>{s["round"]}</td><td>{s["stage"]}</td>'
                    f'<td>{_link(s["manifest"]) if s["manifest"] else "-"}</td><td>{shards}</td><td>{board}</td>'
                    f"<td>{models}</td></tr>")
    return ("<h2>Files</h2><p>Links relative to this page: they hold when the run directory is copied or "
            f"served. The run: {' '.join(_link(rel) for rel in top)}.</p>" + "".join(rows) + "</table>")
