"""score_filter: an image-text score from a local CLIP-style model, and the pairs scored highest kept.

The score is the cosine of the model's image and text features (DataComp's CLIP score). With `keep_top`
every shard is scored first and the threshold is the score above which that fraction of the whole input
lies, read from the shards' histograms (pipeline/shardmap.py's two passes): the driver sums 2,000 bins
over [-1, 1] per shard instead of holding every score, so the kept share is the target to within one
bin's mass (and is written to the manifest). Each sample's score is in its ledger row (`score`) and in a
kept sample's json (`clip_score`); an image that cannot be decoded fails (`image_unreadable`).
"""
from __future__ import annotations

import dataclasses
import html
import io
from pathlib import Path

from pipeline.errors import InputError
from pipeline.fsutil import sha256_file
from pipeline.runs import fingerprint
from pipeline.shardmap import Operator, Verdict, run_shard_map
from pipeline.sources import Sources
from pipeline.stage import Extra, Stage, Upstream, shard_tasks, web_data
from pipeline.storage import as_path
from pipeline.threads import cpu_threads
from stages.score_filter.config import SECTION, ScoreFilterConfig

BINS = 2000   # over [-1, 1]: a bin is 0.001 of cosine


class ClipScore(Operator):
    needs_plan = False   # set per instance: the top fraction needs every shard's histogram first

    def __init__(self, cfg: ScoreFilterConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.needs_plan = cfg.keep_top is not None

    def open(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # a "Loading weights" bar per task would fill the run's log
        folder = self.cfg.clip_model
        self.model = AutoModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.images = AutoImageProcessor.from_pretrained(folder)
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_len = getattr(text_cfg, "max_position_embeddings", None)
        self.torch = torch

    def measure(self, samples: list[dict]) -> list[dict]:
        from PIL import Image

        values: list[dict | None] = [None] * len(samples)
        images, texts, where = [], [], []
        for i, sample in enumerate(samples):
            try:
                with Image.open(io.BytesIO(sample["jpg"])) as img:
                    images.append(img.convert("RGB"))
                texts.append(sample.get("txt", b"").decode("utf-8"))
                where.append(i)
            except KeyError:
                values[i] = {"failed": "image_missing", "error": "no jpg member"}
            except UnicodeDecodeError as err:
                values[i] = {"failed": "caption_not_utf8", "error": str(err)[:200]}
            except Exception as err:  # noqa: BLE001 (a bad image is counted, never crashes the shard)
                values[i] = {"failed": "image_unreadable", "error": f"{type(err).__name__}: {err}"[:200]}
        if where:
            for i, score in zip(where, self._scores(images, texts)):
                values[i] = {"score": round(score, 6)}
        return values

    def _scores(self, images, texts) -> list[float]:
        torch = self.torch
        pixels = self.images(images=images, return_tensors="pt")["pixel_values"]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        # On one thread whatever the task's CPUs: a matmul split over more threads sums in another order, and
        # a score's last digit then depends on cpus_per_task or the executor (an execution-only setting).
        with cpu_threads(1), torch.inference_mode():
            image = _features(self.model.get_image_features(pixel_values=pixels))
            text = _features(self.model.get_text_features(input_ids=enc["input_ids"],
                                                          attention_mask=enc["attention_mask"]))
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        return (image * text).sum(-1).tolist()

    def summarize(self, values: list[dict]) -> dict:
        histogram: dict[str, int] = {}
        for v in values:
            if "score" in v:
                b = str(_bin(v["score"]))
                histogram[b] = histogram.get(b, 0) + 1
        return {"histogram": histogram}

    def plan(self, summaries: list[dict]) -> dict:
        """The threshold whose kept share of the scored pairs is closest to keep_top: a bin's lower edge."""
        counts = [0] * BINS
        for s in summaries:
            for b, n in s["histogram"].items():
                counts[int(b)] += n
        scored, target = sum(counts), self.cfg.keep_top * sum(counts)
        best, above = (-1.0, scored), 0
        for b in range(BINS - 1, -1, -1):
            above += counts[b]
            if abs(above - target) < abs(best[1] - target):
                best = (_edge(b), above)
        return {"threshold": best[0], "scored": scored, "kept_share": round(best[1] / scored, 6) if scored else 0.0}

    def decide(self, sample: dict, value: dict, plan: dict) -> Verdict:
        threshold = plan["threshold"] if self.needs_plan else self.cfg.threshold
        keep = value["score"] >= threshold
        reason = None if keep else ("score_below_top" if self.needs_plan else "score_below_threshold")
        return Verdict(keep, reason, score=value["score"], fields={"clip_score": value["score"]})

    def planned_drops(self, plan: dict) -> dict[str, float]:
        return {"score_below_top": 1 - plan["kept_share"]} if self.needs_plan else {}

    def describe(self, plan: dict, shard_stats: list[dict], out: Path) -> dict:
        rule = {"keep_top": self.cfg.keep_top, **plan} if self.needs_plan else {"threshold": self.cfg.threshold}
        return {"rule": rule, "clip_model": Path(self.cfg.clip_model).name}


def _features(out):
    """transformers 4 returns the projected features; 5 an output whose pooler_output holds them."""
    return out if hasattr(out, "norm") else out.pooler_output


def _bin(score: float) -> int:
    return min(BINS - 1, max(0, int((score + 1.0) / 2.0 * BINS)))


def _edge(b: int) -> float:
    return round(-1.0 + 2.0 * b / BINS, 6)


def run(cfg: ScoreFilterConfig, inputs, ctx):
    return run_shard_map(ClipScore, dataclasses.replace(cfg, clip_model=str(inputs.extra["clip_model"])), inputs, ctx)


def _clip_model(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    """The scoring model enters the fingerprint by its files' content (a new checkpoint is a new result)."""
    given = cfg.score_filter.clip_model
    folder = as_path(given) if given else None
    if folder is None or not (folder / "config.json").is_file():
        raise InputError(f"score_filter.clip_model: {given!r} is not a local Hugging Face model folder (no "
                         "config.json): give the folder a CLIP-style model was saved to (save_pretrained)")
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    digest = [f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files]
    return {"clip_model": Extra(folder, (fingerprint("model", folder.name, digest),))}


def report(page) -> str:
    """The report's section: the model, the rule and its threshold (round 0's result)."""
    manifest = page.dirs[0].manifest()
    if manifest is None:
        return ""
    rule = manifest.details.get("rule", {})
    threshold = f'<b id="score-threshold">{rule["threshold"]:g}</b>'
    how = (f"kept the top {rule['keep_top']:.0%} of {rule['scored']:,} scored pairs: threshold {threshold}, kept "
           f"share {rule['kept_share']:.2%}" if "keep_top" in rule else f"kept a score of at least {threshold}")
    return (f"<h2>Curation operator: {STAGE.name}</h2><p>The cosine of <code>{html.escape(str(manifest.details.get('clip_model')))}</code>'s image and text "
            f"features; {how}. Every sample's score is in the ledger (<code>score</code>).</p>")


STAGE = Stage("score_filter", SECTION, curates_web=True, conserves=True, run=run,
              request=lambda cfg, urls: shard_tasks(cfg, cfg.score_filter.cpus_per_task, urls),
              upstreams=lambda cfg, round_: [web_data(cfg, before="score_filter")], extra_inputs=_clip_model, report=report)
