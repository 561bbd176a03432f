"""balance: MetaCLIP's curation (Xu et al. 2023, "Demystifying CLIP data"): match every caption against a
list of entries (concepts), count the captions per entry over the whole input, and keep about `t` pairs
of an entry that more captions match, so that the head (a "photo", a "background") no longer drowns the
tail. A pair is kept if any entry it matches draws it, with probability min(1, t / count) per entry: an
entry under the cap keeps every pair, and a pair with one rare entry is always kept.

Two passes (pipeline/shardmap.py): each shard's matches are counted first; the driver sums the counts (the
plan, `selection.json`: one number per entry); then each shard is decided. The draw is a hash of (run
seed, sample key, entry): the same pairs on a resumed or re-run stage, whatever the shard order. Each
ledger row lists the entries its caption matched (`entries`; a kept sample's json `balance_entries`);
`entries.parquet` in the stage folder has, per entry, the captions that matched it and the pairs kept, and
the manifest the head of that table.

Matching is by whole words, case-insensitively: MetaCLIP matches substrings, which finds "cat" in
"category". The default entry list is the input's own vocabulary (every word `min_count` captions use,
English function words excepted); give `entries` for a curated list.
"""
from __future__ import annotations

import collections
import hashlib
import html
import re
from pathlib import Path

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_parquet, sha256_file
from pipeline.runs import fingerprint
from pipeline.shardmap import Operator, Verdict, run_shard_map
from pipeline.sources import Sources
from pipeline.stage import Extra, Stage, Upstream, shard_tasks, web_data
from pipeline.storage import as_path
from stages.balance.config import SECTION, BalanceConfig

ENTRIES_TABLE = "entries.parquet"
HEAD = 30   # entries the manifest lists (the most matched); every entry is in entries.parquet
WORD = re.compile(r"\w+")
# Not concepts: with them as entries every caption would match "a" and "on" (MetaCLIP's list has none).
FUNCTION_WORDS = frozenset("""a an the and or but nor of in on at to for from by with without into onto over
under above below near behind beside between against through during before after about as than then so
is are was were be been being am has have had do does did it its this that these those there here he she
they them his her their our your my we you i me him us not no yes very too also just only""".split())


def words(text: str) -> list[str]:
    return WORD.findall(text.casefold())


class Balance(Operator):
    needs_plan = True

    def open(self) -> None:
        self.listed: set[str] | None = None
        if self.cfg.entries:
            lines = Path(self.cfg.entries).read_text(encoding="utf-8").splitlines()
            self.listed = {" ".join(words(line)) for line in lines if words(line)}
            self.longest = max((e.count(" ") + 1 for e in self.listed), default=1)

    def measure(self, samples: list[dict]) -> list[dict]:
        values = []
        for sample in samples:
            try:
                caption = words(sample.get("txt", b"").decode("utf-8"))
            except UnicodeDecodeError as err:
                values.append({"failed": "caption_not_utf8", "error": str(err)[:200]})
                continue
            values.append({"entries": sorted(self._matches(caption))})
        return values

    def _matches(self, caption: list[str]) -> set[str]:
        if self.listed is None:
            return {w for w in caption if w not in FUNCTION_WORDS}
        found = set()
        for n in range(1, self.longest + 1):
            found.update(g for g in (" ".join(caption[i:i + n]) for i in range(len(caption) - n + 1)) if g in self.listed)
        return found

    def summarize(self, values: list[dict]) -> dict:
        return {"counts": collections.Counter(e for v in values for e in v.get("entries", ()))}

    def plan(self, summaries: list[dict]) -> dict:
        counts: collections.Counter = collections.Counter()
        for s in summaries:
            counts.update(s["counts"])
        floor = 1 if self.cfg.entries else self.cfg.min_count
        return {"t": self.cfg.t, "counts": {e: n for e, n in sorted(counts.items()) if n >= floor}}

    def decide(self, sample: dict, value: dict, plan: dict) -> Verdict:
        counts, key = plan["counts"], sample["__key__"]
        matched = [e for e in value["entries"] if e in counts]
        if not matched:
            keep = self.cfg.keep_unmatched
            return Verdict(keep, None if keep else "balance_no_entry", entries=[], fields={"balance_entries": []})
        keep = any(_draw(self.seed, key, e) < plan["t"] / counts[e] for e in matched)
        return Verdict(keep, None if keep else "balance_capped", entries=matched, fields={"balance_entries": matched})

    def planned_drops(self, plan: dict) -> dict[str, float]:
        return {"balance_capped": 1.0}   # the caps remove what they must: the manifest says how much, per entry

    def shard_extra(self, verdicts: list[Verdict]) -> dict:
        return {"kept_entries": collections.Counter(e for v in verdicts if v.keep for e in v.entries or ())}

    def describe(self, plan: dict, shard_stats: list[dict], out: Path) -> dict:
        kept: collections.Counter = collections.Counter()
        for stats in shard_stats:
            kept.update(stats.get("kept_entries", {}))
        rows = sorted(plan["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
        atomic_write_parquet(out / ENTRIES_TABLE, pa.table({
            "entry": pa.array([e for e, _ in rows], pa.string()), "matched": pa.array([n for _, n in rows], pa.int64()),
            "kept": pa.array([kept.get(e, 0) for e, _ in rows], pa.int64())}))
        return {"t": plan["t"], "entries": len(rows), "entries_over_t": sum(1 for _, n in rows if n > plan["t"]),
                "entry_list": Path(self.cfg.entries).name if self.cfg.entries else "the input's caption vocabulary",
                "entries_table": ENTRIES_TABLE, "head": [[e, n, kept.get(e, 0)] for e, n in rows[:HEAD]]}


def _draw(seed: int, key: str, entry: str) -> float:
    """A number in [0, 1) fixed by (seed, key, entry): the same pairs on every run of the same input."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def run(cfg: BalanceConfig, inputs, ctx):
    import dataclasses

    entries = inputs.extra["entries"]
    return run_shard_map(Balance, dataclasses.replace(cfg, entries=str(entries) if entries else None), inputs, ctx)


def _entries(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    """An entry list enters the fingerprint by its content."""
    given = cfg.balance.entries
    if not given:
        return {"entries": Extra(None)}
    path = as_path(given)
    if not path.is_file():
        raise InputError(f"balance.entries: {given} is not a file (one entry per line)")
    return {"entries": Extra(path, (fingerprint("entries", path.name, [sha256_file(path)]),))}


def report(page) -> str:
    """The report's section: the entries, and the most matched with the pairs kept (round 0's result)."""
    manifest = page.dirs[0].manifest()
    if manifest is None:
        return ""
    d = manifest.details
    rows = "".join(f"<tr><td>{html.escape(e)}</td><td>{m}</td><td>{k}</td></tr>" for e, m, k in d.get("head", []))
    return (f"<h2>Curation operator: {STAGE.name}</h2><p>{d.get('entries', 0):,} entries "
            f"({html.escape(str(d.get('entry_list')))}), {d.get('entries_over_t', 0):,} matched by more than t = {d.get('t')} captions. The most matched, with the pairs kept (every entry: "
            f"{page.link_in(page.dirs[0], d.get('entries_table', ENTRIES_TABLE))}):</p>"
            '<table id="balance-entries"><tr><th>entry</th><th>captions matched</th><th>pairs kept</th></tr>'
            f"{rows}</table>")


STAGE = Stage("balance", SECTION, curates_web=True, conserves=True, run=run,
              request=lambda cfg, urls: shard_tasks(cfg, cfg.balance.cpus_per_task, urls), seeded=True,
              upstreams=lambda cfg, round_: [web_data(cfg, before="balance")], extra_inputs=_entries, report=report)
