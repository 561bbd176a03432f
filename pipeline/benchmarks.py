"""Standard evaluations, by format (`evaluate.benchmarks`):

  * karpathy: COCO / Flickr30k retrieval from a Karpathy-split annotation JSON (the original
    `dataset_coco.json` layout with `images[].sentences`, or BLIP's `coco_karpathy_test.json` list of
    {image, caption: [...]}) and an image folder; five (or any number of) captions per image. TR@k: an
    image's query finds one of its own captions in the top k; IR@k: a caption finds its own image. As
    ALBEF and BLIP report them: TR/IR @1/5/10 and their mean, and with `rerank_k`, the ITC top k of each
    query re-ranked by the ITM head's match probability.
  * imagefolder: zero-shot classification, one folder per class (its name, "_" read as a space, is the
    class name, unless a `classnames` file gives them), each class's text feature the normalised mean over the prompt templates; top-1/top-5.
  * wds: CLIP_benchmark's webdataset layout (`<root>/<split>/*.tar` with an image member, `.cls` for
    classification or `.txt` captions, one per line, for retrieval; `classnames.txt` and
    `zeroshot_classification_templates.txt` beside the splits). Each tar is read whole, as every shard vlp
    reads (pipeline/data/shards.py: a cut tar is an InputError naming it); a sample with no image, or
    without the `.cls` or `.txt` its task reads, is skipped and counted (`skipped` in the result).
"""
from __future__ import annotations

import collections
import glob
import json
import logging
from pathlib import Path

import torch

from pipeline.data.loader import decode_image
from pipeline.errors import InputError
from pipeline.model.retrieval import itm_scorer, retrieval_recalls

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
log = logging.getLogger("vlp")


def run_benchmark(bench: dict, model, tok, device: str, batch_size: int) -> dict:
    fmt = bench["format"]
    if fmt == "karpathy":
        images, captions, owner = read_karpathy(bench["path"], bench.get("images"), bench.get("split") or "test",
                                                bench.get("max_items"))
        return retrieval(model, tok, images, captions, owner, device, batch_size, bench.get("rerank_k") or 0)
    if fmt == "imagefolder":
        images, labels, classes = read_imagefolder(bench["path"], bench.get("max_items"), bench.get("classnames"))
        return zero_shot(model, tok, images, labels, classes, bench["templates"], device, batch_size)
    if fmt == "wds":
        root, skipped = Path(bench["path"]), collections.Counter()
        if (root / "classnames.txt").is_file():
            images, labels, classes, templates = read_wds_classification(root, bench.get("split") or "test",
                                                                         bench.get("max_items"), skipped)
            result = zero_shot(model, tok, images, labels, classes, templates or bench["templates"], device, batch_size)
        else:
            images, captions, owner = read_wds_retrieval(root, bench.get("split") or "test", bench.get("max_items"),
                                                         skipped)
            result = retrieval(model, tok, images, captions, owner, device, batch_size, bench.get("rerank_k") or 0)
        if skipped:
            log.warning("benchmark %s: skipped %s", bench["name"], ", ".join(f"{n} sample(s) {reason}"
                                                                            for reason, n in sorted(skipped.items())))
            result["skipped"] = dict(sorted(skipped.items()))
        return result
    raise InputError(f"benchmark {bench['name']}: unknown format {fmt!r}")


# --- readers: (image bytes, ...) -------------------------------------------------------------------

def read_karpathy(annotation: str, image_root: str | None, split: str, limit: int | None):
    entries = _karpathy_entries(annotation, image_root, split)
    images, captions, owner = [], [], []
    for i, (file, texts) in enumerate(entries[:limit] if limit else entries):
        images.append(file.read_bytes())
        captions += texts
        owner += [i] * len(texts)
    return images, captions, owner


def _karpathy_entries(annotation: str, image_root: str | None, split: str) -> list[tuple[Path, list[str]]]:
    """(image file, its captions) of every image of the split; a missing image file is an error."""
    path = Path(annotation)
    if not path.is_file():
        raise InputError(f"{path}: no annotation file")
    data = json.loads(path.read_text())
    root = Path(image_root) if image_root else path.parent
    entries = []
    if isinstance(data, dict) and "images" in data:      # Karpathy's dataset_coco.json / dataset_flickr30k.json
        for img in data["images"]:
            if img.get("split", split) == split:
                rel = Path(img.get("filepath", "")) / img["filename"]
                entries.append((rel, [s["raw"] for s in img["sentences"]]))
    elif isinstance(data, list):                          # BLIP's coco_karpathy_test.json: one split per file
        entries = [(Path(e["image"]), list(e["caption"]) if isinstance(e["caption"], list) else [e["caption"]])
                   for e in data]
    else:
        raise InputError(f"{path}: neither Karpathy's {{images: [...]}} nor BLIP's [{{image, caption}}] layout")
    if not entries:
        raise InputError(f"{path}: no images in split {split!r}")
    for rel, _ in entries:
        if not (root / rel).is_file():
            raise InputError(f"{path}: image {rel} not found under {root}")
    return [(root / rel, texts) for rel, texts in entries]


def read_imagefolder(root: str, limit: int | None, classnames: str | None = None):
    items, names = _imagefolder_items(root, classnames)
    items = items[:limit] if limit else items
    return [f.read_bytes() for f, _ in items], [c for _, c in items], names


def _imagefolder_items(root: str, classnames: str | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image file, class index) of every image, and the class names."""
    folder = Path(root)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise InputError(f"{folder}: no class folders (imagefolder: one folder of images per class)")
    names = [c.replace("_", " ") for c in classes]
    if classnames:
        names = [line.strip() for line in Path(classnames).read_text().splitlines() if line.strip()]
        if len(names) != len(classes):
            raise InputError(f"{classnames}: {len(names)} class names for {len(classes)} class folders in {folder}")
    items = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    return items, names


def _tars(root: Path, split: str) -> list[str]:
    shards = sorted(glob.glob(str(root / split / "*.tar")))
    if not shards:
        raise InputError(f"{root / split}: no .tar shards (CLIP_benchmark's webdataset layout)")
    return shards


def _read_tars(shards: list[str]):
    """The samples of the split's tars in order, extensions in lower case as webdataset gives them; each tar
    read whole (a cut one is an InputError naming it)."""
    from pipeline.data.shards import read_shard

    for shard in shards:
        for sample in read_shard(shard):
            yield {k if k == "__key__" else k.lower(): v for k, v in sample.items()}


def _image_member(sample: dict) -> bytes | None:
    return next((sample[k] for k in ("webp", "jpg", "jpeg", "png") if k in sample), None)


def _wds_samples(root: Path, split: str, limit: int | None, needed: str, skipped: collections.Counter):
    """(image bytes, sample) of the samples that hold an image and the `needed` member; the others counted
    in `skipped` (`missing_image`, `missing_<needed>`)."""
    n = 0
    for sample in _read_tars(_tars(root, split)):
        image = _image_member(sample)
        if image is None or needed not in sample:
            skipped["missing_image" if image is None else f"missing_{needed}"] += 1
            continue
        yield image, sample
        n += 1
        if limit and n >= limit:
            return


def read_wds_classification(root: Path, split: str, limit: int | None, skipped: collections.Counter):
    classes = [line.strip() for line in (root / "classnames.txt").read_text().splitlines() if line.strip()]
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = [t.strip() for t in templates_file.read_text().splitlines() if t.strip()] if templates_file.is_file() else []
    images, labels = [], []
    for image, sample in _wds_samples(root, split, limit, "cls", skipped):
        images.append(image)
        labels.append(int(sample["cls"]))
    return images, labels, classes, [t.replace("{c}", "{}") for t in templates]


def read_wds_retrieval(root: Path, split: str, limit: int | None, skipped: collections.Counter):
    images, captions, owner = [], [], []
    for image, sample in _wds_samples(root, split, limit, "txt", skipped):
        texts = [t for t in sample["txt"].decode("utf-8").splitlines() if t.strip()]
        captions += texts
        owner += [len(images)] * len(texts)
        images.append(image)
    return images, captions, owner


# --- the images alone, for decontamination (stages/prefilter/stage.py): the whole split, in parts -------

PART_IMAGES = 2000   # image files per part: ImageNet's 50k validation images are 25 tasks


def image_parts(bench: dict) -> int:
    """Into how many parts the split's images are cut (a wds benchmark: one per tar). max_items aside:
    it only shortens the evaluation, the whole split is screened."""
    files = _image_files(bench)
    return len(_wds_shards(bench)) if files is None else -(-len(files) // PART_IMAGES)


def part_images(bench: dict, part: int):
    """The bytes of every image of one part, one at a time."""
    for _, image in part_items(bench, part):
        yield image


def part_items(bench: dict, part: int):
    """(name, bytes) of every image of one part, one at a time: the name is the image's path under the
    benchmark's image folder (as its annotation or class folders give it), or `<tar>/<key>` for a
    webdataset split; what prefilter's ledger reports of an eval image a training sample copies."""
    files = _image_files(bench)
    if files is None:
        tar = _wds_shards(bench)[part]
        for sample in _read_tars([tar]):
            image = _image_member(sample)
            if image is not None:
                yield f"{Path(tar).name}/{sample['__key__']}", image
        return
    if bench["format"] == "karpathy":
        root = Path(bench["images"]) if bench.get("images") else Path(bench["path"]).parent
    else:
        root = Path(bench["path"])
    for file in files[part * PART_IMAGES:(part + 1) * PART_IMAGES]:
        yield (file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name), file.read_bytes()


def _image_files(bench: dict) -> list[Path] | None:
    """The split's image files in order; None for a wds benchmark (its images are in tars)."""
    fmt, split = bench["format"], bench.get("split") or "test"
    if fmt == "karpathy":
        return [f for f, _ in _karpathy_entries(bench["path"], bench.get("images"), split)]
    if fmt == "imagefolder":
        return [f for f, _ in _imagefolder_items(bench["path"], bench.get("classnames"))[0]]
    if fmt == "wds":
        return None
    raise InputError(f"benchmark {bench['name']}: unknown format {fmt!r}")


def _wds_shards(bench: dict) -> list[str]:
    return _tars(Path(bench["path"]), bench.get("split") or "test")


# --- metrics ---------------------------------------------------------------------------------------

def _image_features(model, images: list[bytes], device: str, batch_size: int) -> torch.Tensor:
    size, out = model.cfg.image_size, []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([_decode(b, size) for b in images[i:i + batch_size]]).to(device)
        out.append(model("encode_image", batch)[1])
    return torch.cat(out)


def _decode(data: bytes, size: int) -> torch.Tensor:
    return decode_image(data, size, None)   # as the training loader sees an image, without augmentation


def _text_features(model, tok, texts: list[str], device: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=model.cfg.max_text_len, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    feats = torch.cat([model("encode_text", ids[i:i + batch_size], mask[i:i + batch_size])[1]
                       for i in range(0, len(texts), batch_size)])
    return feats, ids, mask


@torch.no_grad()
def retrieval(model, tok, images: list[bytes], captions: list[str], owner: list[int], device: str,
              batch_size: int, rerank_k: int) -> dict:
    """Karpathy-split retrieval: only an image's own captions are right (pipeline/model/retrieval.py)."""
    img = _image_features(model, images, device, batch_size)
    txt, ids, mask = _text_features(model, tok, captions, device, batch_size)
    sim = (img @ txt.t()).cpu()                          # [images, texts]
    own = torch.tensor(owner)[None, :] == torch.arange(len(images))[:, None]
    def decoded() -> torch.Tensor:   # the pixels, decoded only when re-ranking
        return torch.stack([_decode(b, model.cfg.image_size) for b in images]).to(device)

    k = min(rerank_k, len(captions), len(images))
    return {"images": len(images), "texts": len(captions),
            **retrieval_recalls(sim, own, k, itm_scorer(model, decoded, ids, mask, batch_size), model.itc_scale())}


@torch.no_grad()
def zero_shot(model, tok, images: list[bytes], labels: list[int], classes: list[str], templates, device: str,
              batch_size: int) -> dict:
    if not templates:
        raise InputError("zero-shot classification needs prompt templates (benchmark `templates`)")
    feats = []
    for name in classes:
        t, _, _ = _text_features(model, tok, [tpl.format(name) for tpl in templates], device, batch_size)
        feats.append(torch.nn.functional.normalize(t.mean(0), dim=-1))
    class_feat = torch.stack(feats)
    img = _image_features(model, images, device, batch_size)
    logits = (img @ class_feat.t()).cpu()
    target = torch.tensor(labels)
    top = logits.topk(min(5, len(classes)), dim=1).indices
    return {"images": len(images), "classes": len(classes),
            "top1": round((top[:, 0] == target).float().mean().item(), 4),
            "top5": round((top == target[:, None]).any(1).float().mean().item(), 4)}


# --- reporting -------------------------------------------------------------------------------------

def describe(name: str, m: dict) -> str:
    """One line for `vlp status` and the report."""
    if "top1" in m:
        return (f"{name} ({m['format']}, {m['images']} images, {m['classes']} classes): "
                f"zero-shot top-1 {m['top1']:.3f} top-5 {m['top5']:.3f}")
    line = (f"{name} ({m['format']}, {m['images']} images, {m['texts']} texts): ITC TR@1/5/10 "
            f"{m['itc_tr_r1']:.3f}/{m['itc_tr_r5']:.3f}/{m['itc_tr_r10']:.3f} IR@1/5/10 "
            f"{m['itc_ir_r1']:.3f}/{m['itc_ir_r5']:.3f}/{m['itc_ir_r10']:.3f}")
    if "itm_tr_r1" in m:
        line += (f"; ITM re-rank of the top {m['rerank_k']} TR@1/5/10 {m['itm_tr_r1']:.3f}/{m['itm_tr_r5']:.3f}/"
                 f"{m['itm_tr_r10']:.3f} IR@1/5/10 {m['itm_ir_r1']:.3f}/{m['itm_ir_r5']:.3f}/{m['itm_ir_r10']:.3f}")
    if "rerank_tr_r1" in m:
        line += (f"; ITM+ITC TR@1/5/10 {m['rerank_tr_r1']:.3f}/{m['rerank_tr_r5']:.3f}/{m['rerank_tr_r10']:.3f} "
                 f"IR@1/5/10 {m['rerank_ir_r1']:.3f}/{m['rerank_ir_r5']:.3f}/{m['rerank_ir_r10']:.3f}")
    return line


def format_benchmarks(rows: list[dict]) -> str:
    """Per round, each standard evaluation (rows: pipeline.toyweb.measures.rounds)."""
    return "\n".join(f"{r['round']:>5}  {describe(name, m)}" for r in rows
                     for name, m in (r.get("benchmarks") or {}).items())
