"""Download's part of the run's report (pipeline/report.py): its failures per host (the URL's hostname),
each with its reasons, from one pass over three columns of its ledgers (pipeline/reportdata.py)."""
from __future__ import annotations

import html

from pipeline import reportdata
from pipeline.stage import ReportSection

HOSTS_SHOWN = 20


def failures_by_host(page: ReportSection) -> str:
    rows = reportdata.failures_by_host(page.dirs[0].path)
    if not rows:
        return ""
    failed = sum(r["failed"] for r in rows)
    table = ['<table id="failures-by-host"><tr><th>host</th><th>URLs</th><th>failed</th><th>share</th>'
             "<th>failures by reason</th></tr>"]
    for r in rows[:HOSTS_SHOWN]:
        reasons = ", ".join(f"{html.escape(k)} {v}" for k, v in r["reasons"].most_common())
        table.append(f'<tr data-host="{html.escape(r["host"])}" data-failed="{r["failed"]}"><td>'
                     f'{html.escape(r["host"] or "(no host)")}</td><td>{r["urls"]}</td><td>{r["failed"]}</td>'
                     f'<td>{r["failed"] / max(1, r["urls"]):.1%}</td><td>{reasons}</td></tr>')
    rest = rows[HOSTS_SHOWN:]
    if rest:
        table.append(f"<tr><td>{len(rest)} other hosts</td><td>{sum(r['urls'] for r in rest)}</td>"
                     f"<td>{sum(r['failed'] for r in rest)}</td><td></td><td></td></tr>")
    hosts = f"{len(rows)} host" + ("s" if len(rows) > 1 else "")
    return (f"<h2>Download failures by host</h2><p>{failed} of {sum(r['urls'] for r in rows)} URLs failed, over "
            f"{hosts}; the {min(len(rows), HOSTS_SHOWN)} with the most failures:</p>" + "".join(table) + "</table>")
