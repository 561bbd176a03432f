"""The model card (README.md) of `vlp export --format hf` (pipeline/hfexport.py): HF's YAML front matter,
then what the model folder and, while the folder is still its committed stage's export, the run's
manifests recorded (URL lists, each upstream stage's counts and fingerprint, training, evaluation
figures, the weights' sha256). Figures are quoted as recorded, never estimated."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.model.objectives import LOSSES
from pipeline.stage import declared, having
from pipeline.storage import as_path

TAGS = ["vlp", "vision-language", "multiway-transformer", "vlmo", "image-text-retrieval", "custom_code"]
METRIC_LEGEND = ("`tr`: text retrieval (image to caption), `ir`: image retrieval; `r1`/`r5`/`r10`: recall at 1/5/10; "
                 "`itc_`: ranked by embedding similarity, `itm_`: the top `rerank_k` re-ranked by the match head alone, "
                 "`rerank_`: by the match head and the similarity together; "
                 "`top1`/`top5`: zero-shot classification accuracy; `attribute_probe`: linear-probe accuracy per "
                 "attribute on frozen image features; `chance_r1`: recall at 1 by chance.")


def model_card(model_dir: Path, info: dict, cfg, parameters: int) -> str:
    """README.md: HF's YAML front matter, then what the model folder and, while the folder is still the
    export of a committed stage of its run, the run recorded: data, training, evaluations, fingerprints.
    Nothing is estimated: a figure the records lack is not in the card."""
    import yaml

    from pipeline.fsutil import sha256_file

    run = _run_record(model_dir, info)
    licenses = _checkpoint_licenses(info, run)
    front = {"library_name": "transformers", "pipeline_tag": "zero-shot-image-classification", "tags": TAGS}
    front.update(_agreed(licenses))
    train = training_config(info)
    title = " ".join(x for x in ("vlp Multiway Transformer", f"`{train['model']}`" if "model" in train else "") if x)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"A VLMo-style Multiway Transformer ({parameters:,} parameters: shared self-attention, vision, "
             "language and vision-language experts) pretrained by vlp. Its image and text encoders give "
             "L2-normalised embeddings whose scaled dot products are CLIP-style `logits_per_image`; the "
             "fusion encoder, the image-text matching and captioning heads are reached through "
             "`model.multiway(mode, ...)`.", "", *_usage(cfg), *_data(model_dir, run), *_training(info, run),
             *_evaluation(run), "## Fingerprints", "",
             *_table(["what", "value"], _fingerprints(info, run, sha256_file(model_dir / "model.safetensors"))),
             "", *_intended_use(), *_limits(cfg, train, licenses)]
    return "\n".join(lines) + "\n"


def _run_record(model_dir: Path, info: dict) -> dict | None:
    """The run's record of this model, or None when the folder is not the export of the committed stage
    beside it (copied elsewhere, or the stage rebuilt since): the stage's manifest, the committed results
    upstream of it (followed through the manifests' input fingerprints, superseded ones included), oldest
    first, and the newest evaluation that took this model as input."""
    from pipeline.fsutil import read_json
    from pipeline.manifest import Manifest
    from pipeline.runs import MANIFEST, RunDir, StageDir

    manifest_path = model_dir.parent / MANIFEST
    if not manifest_path.is_file():
        return None
    own = Manifest.from_json(read_json(manifest_path))
    if own.details.get("export") != model_dir.name or own.fingerprint != info.get("fingerprint"):
        return None
    run = RunDir(model_dir.parent.parent.parent)
    found = [sd.manifest() for sd in run.stage_dirs()]
    found += [StageDir(as_path(row["path"]), "", 0).manifest() for row in run.superseded() if row["complete"]]
    by_id = {m.result_id: m for m in found if m is not None}
    lineage, todo = {}, list(own.inputs)
    while todo:
        fp = todo.pop()
        if fp in by_id and fp not in lineage:
            lineage[fp] = by_id[fp]
            todo.extend(by_id[fp].inputs)
    evaluations = [m for m in by_id.values() if declared(m.stage, "evaluates", False) and own.result_id in m.inputs]
    return {"manifest": own, "lineage": sorted(lineage.values(), key=lambda m: m.finished), "by_id": by_id,
            "evaluation": max(evaluations, key=lambda m: m.finished) if evaluations else None}


def _usage(cfg) -> list[str]:
    return ["## Use", "", "```python", "from transformers import AutoModel, AutoProcessor, pipeline", "",
            'classifier = pipeline("zero-shot-image-classification", model=FOLDER, trust_remote_code=True)',
            'classifier(image, candidate_labels=["a red circle", "a blue square"], hypothesis_template="{}")', "",
            "model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)",
            "processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)",
            'inputs = processor(text=captions, images=images, return_tensors="pt", padding=True)',
            "out = model(**inputs)   # image_embeds, text_embeds, logits_per_image, logits_per_text", "```", "",
            "trust_remote_code=True runs this folder's Python files and no others: configuration_vlp.py, "
            "modeling_vlp.py, processing_vlp.py and vlp's own multiway.py and config.py (torch only).",
            f"Images are resized to {cfg.image_size} x {cfg.image_size} pixels; texts have at most "
            f"{cfg.max_text_len} tokens.", ""]


def _data(model_dir: Path, run: dict | None) -> list[str]:
    lines = ["## Training data", ""]
    if run is None:
        return lines + [f"Not recorded here: `{model_dir.name}` was exported outside its run directory (or its "
                        "stage was rebuilt since), so the run's sources, counts and evaluations are unknown to "
                        "this card.", ""]
    stages = run["lineage"] + [run["manifest"]]
    for m in (m for m in stages if declared(m.stage, "fetches", False)):
        lists = m.details.get("lists") or []
        fps = m.inputs if len(m.inputs) == len(lists) else [""] * len(lists)
        lines += [f"URL lists downloaded (round {m.round}):", "",
                  *_table(["list", "format", "file", "fingerprint"],
                          [[spec.get("name") or "", spec.get("format", ""), Path(str(spec.get("path", ""))).name, fp]
                           for spec, fp in zip(lists, fps)]), ""]
    seed = run["manifest"].details.get("seed_samples")
    if seed:
        lines += [f"Pretraining also used {seed} samples of the run's clean seed set.", ""]
    rows = []
    for m in stages:
        t = m.totals
        reasons = sorted((t.dropped + t.failed).items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        rows.append([m.stage, m.round, m.fingerprint, t.samples_in, t.samples_kept, t.samples_dropped,
                     t.samples_failed, ", ".join(f"{k} {v}" for k, v in reasons)])
    return lines + ["What each stage did with the samples (the most frequent reasons for a drop or failure):", "",
                    *_table(["stage", "round", "fingerprint", "in", "kept", "dropped", "failed", "reasons"], rows), ""]


def _training(info: dict, run: dict | None) -> list[str]:
    train, items = training_config(info), []
    if "role" in info:
        items.append(f"CapFilt {info['role']}, fine-tuned from the model whose weights' sha256 begins "
                     f"`{info.get('base_model')}`")
    if "steps" in train:
        batch = [train.get(k) for k in ("micro_batch", "grad_accum", "num_workers")]
        global_batch = f", global batch {batch[0] * batch[1] * batch[2]}" if None not in batch else ""
        items.append(f"{train['steps']} steps{global_batch}, learning rate {train.get('lr')}")
    if train.get("loss_weights"):
        items.append("objectives (loss weights): " + ", ".join(f"{k} {v}" for k, v in train["loss_weights"].items()))
    init = {k: Path(str(v)).name for k, v in (train.get("init_from") or {}).items() if v}
    if init:
        items.append("started from " + ", ".join(f"{k}: `{v}`" for k, v in init.items()))
    if run is not None:
        m = run["manifest"]
        items.append(f"{m.totals.samples_in} training samples, {m.details.get('epochs')} epochs, "
                     f"{m.duration_s} s")
        final = m.details.get("final") or {}
        losses = {k: v for k, v in final.items() if k in ("loss", *LOSSES, "itm_acc")}
        if losses:
            items.append(f"at step {final.get('step')}: " + ", ".join(f"{k} {v}" for k, v in losses.items()))
    return ["## Training", "", *(f"- {item}" for item in items), ""] if items else []


def _evaluation(run: dict | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if run is None:
        return lines + ["Not recorded here (see Training data).", ""]
    m = run["evaluation"]
    if m is None:
        return lines + ["The run has no evaluation of this model (no committed evaluation took it as input).", ""]
    metrics = m.details.get("metrics") or {}
    lines += [f"From the run's evaluation (stage `{m.stage}`, round {m.round}, fingerprint `{m.fingerprint}`). {METRIC_LEGEND}", ""]
    groups = {"Held-out split": {k: v for k, v in metrics.items() if not isinstance(v, dict)}}
    for key, group in ((k, v) for k, v in metrics.items() if isinstance(v, dict)):   # attribute_probe, benchmarks
        groups[key] = {k: v for k, v in group.items() if not isinstance(v, dict)}
        groups.update({f"{key}, {name}": figures for name, figures in group.items() if isinstance(figures, dict)})
    for caption, figures in ((c, f) for c, f in groups.items() if f):
        lines += [f"{caption}:", "", *_table(["figure", "value"], [[k, _value(v)] for k, v in figures.items()]), ""]
    return lines


def _fingerprints(info: dict, run: dict | None, weights_sha256: str) -> list[list]:
    rows = [["weights (sha256 of the model folder's model.safetensors)", weights_sha256]]
    if info.get("fingerprint"):
        rows.append(["training stage (its config and inputs)", info["fingerprint"]])
    if run is not None:
        own, by_id = run["manifest"], run["by_id"]
        named = [f"{by_id[fp].stage} (round {by_id[fp].round}) {fp}" if fp in by_id else fp for fp in own.inputs]
        rows += [["training stage's inputs", "; ".join(named)], ["vlp code version", own.code_version]]
        if run["evaluation"] is not None:
            rows.append(["evaluation stage", run["evaluation"].fingerprint])
    return rows


def _intended_use() -> list[str]:
    return ["## Intended use", "",
            "Research on vision-language pretraining and data curation: zero-shot image classification and "
            "image-text retrieval on images like those it was trained on, a starting point for fine-tuning, "
            "and comparing what different curation settings give. Not for decisions about people, nor for any "
            "use its evaluations above do not cover.", ""]


def _limits(cfg, train: dict, licenses: dict) -> list[str]:
    tokenizer = train.get("tokenizer") or (train.get("init_from") or {}).get("text")
    items = [f"Texts longer than {cfg.max_text_len} tokens do not fit: the processor truncates them, transformers' "
             "zero-shot pipeline does not (it then raises an error: shorten the labels or `hypothesis_template`).",
             f"Vocabulary of {cfg.vocab_size} tokens, "
             + (f"from `{Path(str(tokenizer)).name}`" if tokenizer else "built by vlp from the run's own captions")
             + ": words it never saw become pieces or [UNK].",
             f"Images are resized to {cfg.image_size} x {cfg.image_size} pixels without keeping their aspect ratio, "
             "as in training.",
             "Web image-text pairs carry the biases and errors of their sources; the run's filters (opt-outs, "
             "captions, duplicates, evaluation leaks) are not safety or fairness filters, and the model was not "
             "evaluated for either."]
    if not licenses:
        items.append("No license is recorded: choose one, mindful of the training data's terms, before publishing.")
    elif "license" not in _agreed(licenses):
        items.append("Licenses of the checkpoints it started from: "
                     + ", ".join(f"`{k}` {v or 'unknown'}" for k, v in licenses.items())
                     + " (the front matter names none: they are not one known license).")
    return ["## Limits", "", *(f"- {item}" for item in items)]


def _agreed(licenses: dict) -> dict:
    values = set(licenses.values())
    return {"license": values.pop()} if len(values) == 1 and None not in values else {}


def _checkpoint_licenses(info: dict, run: dict | None) -> dict:
    """{checkpoint folder name: its model card's `license`, or None}, for the transformers checkpoints
    the training started from (the training config's `init_from`, this model's and its upstream trainings')."""
    import yaml

    configs = [training_config(info)]
    if run is not None:
        configs += [m.config for m in run["lineage"] if declared(m.stage, "trains", False) and isinstance(m.config, dict)]
    found = {}
    for folder in (v for c in configs for v in (c.get("init_from") or {}).values() if v):
        card, license_ = as_path(folder) / "README.md", None
        if card.is_file() and card.read_text().startswith("---"):
            meta = yaml.safe_load(card.read_text().split("---", 2)[1]) or {}
            license_ = meta.get("license") if isinstance(meta.get("license"), str) else None
        found[Path(str(folder)).name] = license_
    return found


def training_config(info: dict) -> dict:
    """The config of the stage that trained the model, as its folder's config.yaml holds it: under that
    stage's name (the registry's stage that declares `trains`)."""
    return next((info[name] for name in having("trains") if isinstance(info.get(name), dict)), {})


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")   # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]
