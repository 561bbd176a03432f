"""What a run achieved, round over round, and — on the toy web — how good the filter is against the truth.

The pipeline itself never reads the toy web's truth file; only these measurements do. A noisy pair is
one whose published caption does not describe its image (mismatched, boilerplate, wrong attribute,
empty or garbage). The filter *removes* a pair when it rejects its web caption; precision and recall
of that removal are measured over the pairs that entered CapFilt.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

from pipeline.toyweb.world import ATTRIBUTES, CHOICES
from pipeline.runs import RunDir


def load_truth(run: RunDir) -> dict[str, dict] | None:
    """{url: truth row} of the run's toy web, or None for a run over other data."""
    path = run.root / "toyweb" / "truth.parquet"
    if not path.is_file():
        return None
    from pipeline.fsutil import read_parquet

    table = read_parquet(path, columns=["url", "noise", "noisy", "split", "caption", *ATTRIBUTES])
    return {row["url"]: row for row in table.to_pylist()}


def _with_truth(decided: list[dict], truth: dict[str, dict]) -> list[tuple[dict, dict]]:
    """(decision, truth row) for every decided image whose URL the truth knows."""
    return [(d, truth[d["url"]]) for d in decided if d.get("url") in truth]


def filter_quality(decided: list[dict], truth: dict[str, dict]) -> dict | None:
    """Precision and recall of the filter at removing noisy web pairs (None if no pair is in the truth)."""
    known = _with_truth(decided, truth)
    if not known:
        return None
    removed = [not d["web_kept"] for d, _ in known]
    noisy = [t["noisy"] for _, t in known]
    tp = sum(r and n for r, n in zip(removed, noisy))
    by_kind = collections.defaultdict(lambda: [0, 0])  # kind -> [removed, total]
    for (d, t), r in zip(known, removed):
        by_kind[t["noise"]][0] += r
        by_kind[t["noise"]][1] += 1
    return {"pairs": len(known), "noisy": sum(noisy), "removed": sum(removed),
            "precision": round(tp / sum(removed), 4) if sum(removed) else None,
            "recall": round(tp / sum(noisy), 4) if sum(noisy) else None,
            "removed_by_noise": {k: {"removed": v[0], "of": v[1]} for k, v in sorted(by_kind.items())},
            "wrong_attribute_removed": _wrong_attribute_removed(known)}


def _words(text: str | None) -> set[str]:
    return set(re.findall(r"[a-z]+", (text or "").lower()))


def named_correctly(text: str | None, row: dict, attribute: str) -> bool:
    """Whether `text` names the attribute's true value and no other value of that attribute."""
    words = _words(text)
    return row[attribute] in words and not any(v in words for v in CHOICES[attribute] if v != row[attribute])


def _wrong_attribute_removed(known: list[tuple[dict, dict]]) -> dict[str, dict[str, int]]:
    """For the "wrong attribute" noise: per attribute that the published caption got wrong, how many
    of those captions the filter removed. Shows which attributes the filter can tell apart."""
    out = {a: {"removed": 0, "of": 0} for a in ATTRIBUTES}
    for d, t in known:
        if t["noise"] != "wrong_attribute":
            continue
        wrong = [a for a in ATTRIBUTES if not named_correctly(t["caption"], t, a)]
        if wrong:
            out[wrong[0]]["removed"] += not d["web_kept"]
            out[wrong[0]]["of"] += 1
    return out


def captioner_quality(decided: list[dict], truth: dict[str, dict]) -> dict | None:
    """Share of synthetic captions that name each attribute of their image correctly, and all five."""
    known = _with_truth(decided, truth)
    if not known:
        return None
    right = {a: sum(named_correctly(d["synthetic_caption"], t, a) for d, t in known) for a in ATTRIBUTES}
    every = sum(all(named_correctly(d["synthetic_caption"], t, a) for a in ATTRIBUTES) for d, t in known)
    return {"images": len(known), "correct": {a: round(n / len(known), 4) for a, n in right.items()},
            "all_correct": round(every / len(known), 4)}


def rounds(run_dir: str | Path, truth: dict[str, dict] | None = None) -> list[dict]:
    """One row per round that a stage gave figures for (Stage.figures: training samples, synthetic share,
    retrieval, filter quality), each stage's in graph order. `truth` (load_truth) is read from the run
    when a stage asks for it and it was not given."""
    import stages

    run = RunDir(run_dir)
    loaded: list = [] if truth is None else [truth]

    def known() -> dict[str, dict] | None:
        if not loaded:
            loaded.append(load_truth(run))
        return loaded[0]

    rows = []
    for r in run.rounds():
        row: dict = {"round": r}
        for name in stages.NAMES:
            spec, folder = stages.stage(name), run.stage(name, r)
            manifest = folder.manifest() if spec.figures is not None else None
            if manifest is not None:
                row.update(spec.figures(folder, manifest, known))
        if len(row) > 1:
            rows.append(row)
    return rows


def format_rounds(rows: list[dict]) -> str:
    def f(v, pattern="{:.3f}"):
        return "-" if v is None else pattern.format(v)

    lines = [f"{'round':>5}  {'capfilt in':>10} {'kept':>6} {'pairs out':>9} {'synthetic':>9} {'train':>7} "
             f"{'TR@1':>6} {'IR@1':>6} {'filter P':>8} {'filter R':>8} {'caption 5/5':>11} "
             f"{'probe shape':>11} {'probe pos.':>10}"]
    for r in rows:
        flt, probe = r.get("filter") or {}, r.get("probe") or {}
        lines.append(f"{r['round']:>5}  {f(r.get('capfilt_in'), '{}'):>10} {f(r.get('capfilt_kept'), '{}'):>6} "
                     f"{f(r.get('pairs_out'), '{}'):>9} {f(r.get('synthetic_share'), '{:.1%}'):>9} "
                     f"{f(r.get('train_samples'), '{}'):>7} {f(r.get('tr_r1')):>6} {f(r.get('ir_r1')):>6} "
                     f"{f(flt.get('precision')):>8} {f(flt.get('recall')):>8} "
                     f"{f((r.get('captioner') or {}).get('all_correct'), '{:.1%}'):>11} "
                     f"{f(probe.get('shape')):>11} {f(probe.get('position')):>10}")
    return "\n".join(lines)


def format_noise_kinds(rows: list[dict]) -> str:
    """Per round, the filter's recall for each kind of noise (toy web only; empty otherwise)."""
    lines = []
    for r in rows:
        kinds = (r.get("filter") or {}).get("removed_by_noise") or {}
        noisy = {k: v for k, v in kinds.items() if k != "none"}
        if noisy:
            clean = kinds.get("none", {"removed": 0, "of": 0})
            lines.append(f"{r['round']:>5}  " + "  ".join(
                f"{k} {v['removed']}/{v['of']} ({v['removed'] / v['of']:.1%})" for k, v in sorted(noisy.items()))
                + f"  | clean pairs removed {clean['removed']}/{clean['of']}")
    return "\n".join(lines)


def format_attributes(rows: list[dict]) -> str:
    """Per round, attribute by attribute: wrong-attribute captions the filter removed, and how often the
    captioner named the attribute right (toy web only; empty otherwise)."""
    lines = []
    for r in rows:
        flt, cap = r.get("filter") or {}, r.get("captioner")
        removed = flt.get("wrong_attribute_removed")
        if not removed or not cap:
            continue
        if not lines:
            lines.append(f"{'round':>5}  {'attribute':<10} {'wrong-attribute removed':>23} {'captioned right':>15}")
        for a in ATTRIBUTES:
            lines.append(f"{r['round']:>5}  {a:<10} {removed[a]['removed']:>14} of {removed[a]['of']:<5} "
                         f"{cap['correct'][a]:>15.1%}")
        lines.append(f"{r['round']:>5}  {'all five':<10} {'':>23} {cap['all_correct']:>15.1%}")
    return "\n".join(lines)
