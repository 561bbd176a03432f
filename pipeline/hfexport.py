"""`vlp export MODEL_DIR --format hf OUT`: a vlp model folder as a Hugging Face model folder, as a Hub
model is one: `AutoModel`, `AutoModelForZeroShotImageClassification`, `AutoProcessor`, `AutoTokenizer`,
`AutoImageProcessor` and `pipeline("zero-shot-image-classification")` load it (trust_remote_code=True),
and its README.md is a model card.

No BEiT-3 / VLMo class exists in transformers, so the folder carries its modelling code, as remote-code
models do: the model package's own multiway.py and config.py (torch only; the same code vlp trains and
evaluates with) and three small adapters (pipeline/hf_template/). That code is the only code the folder
names: trust_remote_code=True runs whatever an `auto_map` names, so an `auto_map` the source tokenizer
brought (a module of its own, or `repo--module.Class`, fetched from another Hub repository) is dropped
with a warning, and any other .py file is removed. The weights are vlp's, renamed under `multiway.`; the
tokenizer is the model's; the image processor resizes and normalises as vlp's loader.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from pipeline.errors import InputError
from pipeline.fsutil import atomic_path
from pipeline.storage import as_path, resolve

log = logging.getLogger("vlp")

TEMPLATE = Path(__file__).parent / "hf_template"
MODEL_CODE = Path(__file__).parent / "model"
TEMPLATE_FILES = ("configuration_vlp.py", "modeling_vlp.py", "processing_vlp.py")
MODEL_FILES = ("multiway.py", "config.py")
OWN_MODULES = {name[:-3] for name in TEMPLATE_FILES}   # what an auto_map may name
AUTO_MAP = {"AutoConfig": "configuration_vlp.VlpMultiwayConfig", "AutoModel": "modeling_vlp.VlpMultiwayModel",
            "AutoModelForZeroShotImageClassification": "modeling_vlp.VlpMultiwayModel"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_vlp.VlpMultiwayProcessor"}


def export_hf(model_dir: str, out: str) -> Path:
    """Write the HF folder `out` (atomically; an existing folder is an error, not overwritten)."""
    from safetensors.torch import save_file

    from pipeline.modelio import load_pretrained

    target = as_path(out)
    if target.exists():
        raise InputError(f"{target}: exists; export writes a new folder (remove it or pick another name)")
    model, tokenizer, info = load_pretrained(model_dir)
    cfg = model.cfg
    card = model_card(resolve(model_dir), info, cfg, sum(t.numel() for t in model.state_dict().values()))
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        state = {f"multiway.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE / name, tmp / name)
        for name in MODEL_FILES:
            shutil.copyfile(MODEL_CODE / name, tmp / name)
        config = {"model_type": "vlp_multiway", "architectures": ["VlpMultiwayModel"], "auto_map": AUTO_MAP,
                  "multiway": asdict(cfg), "dtype": "float32",
                  "vlp": {k: info[k] for k in ("fingerprint", "parameters") if k in info}}
        _write_json(tmp / "config.json", config)
        # truncation=True must cut a caption to what the model's text positions hold (the saved
        # tokenizer said 1e30, and a 57-token caption failed with a shape error)
        tokenizer.model_max_length = cfg.max_text_len
        tokenizer.save_pretrained(str(tmp))
        _write_json(tmp / "preprocessor_config.json", _image_processor(cfg.image_size))
        _write_json(tmp / "processor_config.json", {"processor_class": "VlpMultiwayProcessor",
                                                    "auto_map": PROCESSOR_AUTO_MAP})
        (tmp / "README.md").write_text(card)
        _only_own_code(tmp)
        _readable(tmp)
    return target


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _only_own_code(folder: Path) -> None:
    """Leave in `folder` no code but vlp's: every .py file but ours removed, every auto_map entry that
    names another module (a tokenizer's own class, `repo--module.Class` on the Hub) dropped, each with
    a warning. The tokenizer's config also loses what only described the exporting machine's load."""
    ours = set(TEMPLATE_FILES) | set(MODEL_FILES)
    for path in sorted(folder.rglob("*.py")):
        if path.relative_to(folder).as_posix() not in ours:
            log.warning("export: removed %s: an export holds only vlp's own code", path.name)
            path.unlink()
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        changed = False
        if path.name == "tokenizer_config.json":
            changed = data.pop("is_local", None) is not None
            changed = data.pop("local_files_only", None) is not None or changed
        auto_map = data.get("auto_map")
        if isinstance(auto_map, dict):
            foreign = {k: v for k, v in auto_map.items() if not _names_own_code(v)}
            if foreign:
                log.warning("export: dropped %s's auto_map entries %s: they name code vlp does not ship, which "
                            "trust_remote_code=True would import or fetch", path.name, json.dumps(foreign))
                kept = {k: v for k, v in auto_map.items() if k not in foreign}
                data["auto_map"] = kept
                if not kept:
                    del data["auto_map"]
                changed = True
        if changed:
            _write_json(path, data)


def _names_own_code(reference) -> bool:
    """An auto_map value ("module.Class", or a tokenizer's [slow, fast] pair) naming only our modules."""
    refs = [r for r in (reference if isinstance(reference, (list, tuple)) else [reference]) if r is not None]
    return bool(refs) and all(isinstance(r, str) and "--" not in r and r.count(".") == 1
                              and r.split(".")[0] in OWN_MODULES for r in refs)


def _readable(folder: Path) -> None:
    """A model folder others load (a shared disk, a Hub upload): files 0644, folders 0755 (safetensors
    wrote its file 0600)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _image_processor(size: int) -> dict:
    """ViTImageProcessor settings that give the pixels vlp's loader gives (pipeline/data/loader.py):
    RGB, bicubic resize to size x size, scaled to [0, 1], then (x - 0.5) / 0.5."""
    from pipeline.data.loader import MEAN, STD

    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": MEAN.tolist(), "image_std": STD.tolist(), "do_convert_rgb": True}


# --- the model card (README.md) ----------------------------------------------------------------------

TAGS = ["vlp", "vision-language", "multiway-transformer", "vlmo", "image-text-retrieval", "custom_code"]
METRIC_LEGEND = ("`tr`: text retrieval (image to caption), `ir`: image retrieval; `r1`/`r5`/`r10`: recall at 1/5/10; "
                 "`itc_`: ranked by embedding similarity, `itm_`: the top `rerank_k` re-ranked by the match head; "
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
    train = info.get("pretrain") or {}
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
    evaluations = [m for m in by_id.values() if m.stage == "evaluate" and own.result_id in m.inputs]
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
    for m in (m for m in stages if m.stage == "download"):
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
    train, items = info.get("pretrain") or {}, []
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
        losses = {k: v for k, v in final.items() if k in ("loss", "itc", "itm", "mlm", "lm", "bow", "itm_acc")}
        if losses:
            items.append(f"at step {final.get('step')}: " + ", ".join(f"{k} {v}" for k, v in losses.items()))
    return ["## Training", "", *(f"- {item}" for item in items), ""] if items else []


def _evaluation(run: dict | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if run is None:
        return lines + ["Not recorded here (see Training data).", ""]
    m = run["evaluation"]
    if m is None:
        return lines + ["The run has no evaluation of this model (no committed evaluate stage took it as input).", ""]
    metrics = m.details.get("metrics") or {}
    lines += [f"From the run's evaluate stage (round {m.round}, fingerprint `{m.fingerprint}`). {METRIC_LEGEND}", ""]
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
    the training started from (`pretrain.init_from`, this model's and its upstream trainings')."""
    import yaml

    configs = [info.get("pretrain") or {}]
    if run is not None:
        configs += [m.config for m in run["lineage"] if m.stage == "pretrain" and isinstance(m.config, dict)]
    found = {}
    for folder in (v for c in configs for v in (c.get("init_from") or {}).values() if v):
        card, license_ = as_path(folder) / "README.md", None
        if card.is_file() and card.read_text().startswith("---"):
            meta = yaml.safe_load(card.read_text().split("---", 2)[1]) or {}
            license_ = meta.get("license") if isinstance(meta.get("license"), str) else None
        found[Path(str(folder)).name] = license_
    return found


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")   # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]
