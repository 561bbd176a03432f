"""Standard evaluations through their real file layouts: the toy web's Karpathy-split "COCO" and
ImageNet-style folder, the same data in BLIP's annotation layout and in CLIP_benchmark's webdataset
layout (the readers must agree), the recall arithmetic on a similarity matrix worked by hand, and
prefilter screening the benchmarks' images out of the training data."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.benchmarks import run_benchmark
from stages.evaluate.config import BenchmarkConfig
from pipeline.configtree import to_plain
from pipeline.data.shards import write_shard
from pipeline.data.tokenizer import train_tokenizer
from pipeline.model import SIZES, MultiwayTransformer
from pipeline.model.retrieval import retrieval_recalls


def test_recalls_on_a_matrix_worked_by_hand():
    # 2 images, 4 texts: texts 0, 1 describe image 0; texts 2, 3 image 1
    sim = torch.tensor([[0.1, 0.9, 0.8, 0.0],     # image 0: best text is its own (1)        -> TR rank 0
                        [0.7, 0.2, 0.1, 0.3]])    # image 1: own best 0.3, beaten by 0.7     -> TR rank 1
    owner = torch.tensor([0, 0, 1, 1])
    out = retrieval_recalls(sim, owner[None, :] == torch.arange(2)[:, None])
    assert out["itc_tr_r1"] == 0.5 and out["itc_tr_r5"] == 1.0
    # IR: text 0 -> image 1 scores higher (rank 1); text 1 -> own (0); text 2 -> image 0 higher (1); text 3 -> own (0)
    assert out["itc_ir_r1"] == 0.5 and out["itc_ir_r5"] == 1.0
    assert out["itc_r_mean"] == round((0.5 + 1 + 1 + 0.5 + 1 + 1) / 6, 4)


@pytest.fixture(scope="module")
def tiny_model(toyweb, tmp_path_factory):
    captions = [e["sentences"][0]["raw"] for e in json.loads(Path(toyweb.benchmarks[0]["path"]).read_text())["images"]]
    tok = train_tokenizer(captions * 2, 200, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    return MultiwayTransformer(SIZES["tiny"].replace(vocab_size=len(tok))).eval(), tok


def _bench(**kwargs) -> dict:
    return to_plain(BenchmarkConfig(**kwargs))


def test_toy_coco_in_karpathy_blip_and_wds_layouts_gives_the_same_retrieval(toyweb, tiny_model, tmp_path):
    model, tok = tiny_model
    coco = next(b for b in toyweb.benchmarks if b["format"] == "karpathy")
    karpathy = run_benchmark(_bench(name="coco", format="karpathy", path=coco["path"], rerank_k=4), model, tok, "cpu", 16)
    assert karpathy["images"] == 40 and karpathy["texts"] == 200   # five captions per image
    assert {"itc_tr_r10", "itc_ir_r10", "itc_r_mean", "itm_tr_r1", "itm_ir_r5"} <= set(karpathy)
    assert all(0 <= karpathy[k] <= 1 for k in karpathy if "_r" in k)

    data = json.loads(Path(coco["path"]).read_text())
    folder = tmp_path / "blip"
    blip = [{"image": f"{e['filepath']}/{e['filename']}", "caption": [s["raw"] for s in e["sentences"]]}
            for e in data["images"]]
    (folder).mkdir()
    (folder / "coco_karpathy_test.json").write_text(json.dumps(blip))
    root = str(toyweb.folder / "coco")
    same = run_benchmark(_bench(name="coco", format="karpathy", path=str(folder / "coco_karpathy_test.json"),
                                images=root, rerank_k=4), model, tok, "cpu", 16)
    assert same == karpathy

    wds_root = tmp_path / "wds"
    samples = [{"__key__": f"s{i:05d}", "jpg": (toyweb.folder / "coco" / e["filepath"] / e["filename"]).read_bytes(),
                "txt": "\n".join(s["raw"] for s in e["sentences"]).encode()} for i, e in enumerate(data["images"])]
    write_shard(wds_root / "test" / "0.tar", iter(samples[:25]))
    write_shard(wds_root / "test" / "1.tar", iter(samples[25:]))
    assert run_benchmark(_bench(name="coco", format="wds", path=str(wds_root), rerank_k=4), model, tok, "cpu", 16) == karpathy


def test_the_re_ranks_keep_the_itc_order_where_itm_is_indifferent(toyweb, tiny_model):
    """With an ITM head that says the same for every pair, both re-ranks are the ITC ranking (in both
    directions, at every k); with one that knows each image's own captions, ITM+ITC finds them all."""
    import copy

    model, tok = tiny_model
    coco = next(b for b in toyweb.benchmarks if b["format"] == "karpathy")
    bench = _bench(name="coco", format="karpathy", path=coco["path"], rerank_k=10)
    indifferent = copy.deepcopy(model)
    torch.nn.init.zeros_(indifferent.itm_head.weight)
    torch.nn.init.zeros_(indifferent.itm_head.bias)
    out = run_benchmark(bench, indifferent, tok, "cpu", 16)
    for d in ("tr", "ir"):
        for r in (1, 5, 10):
            assert out[f"rerank_{d}_r{r}"] == out[f"itm_{d}_r{r}"] == out[f"itc_{d}_r{r}"]



def test_a_re_rank_puts_the_re_rankers_order_first_and_breaks_ties_by_itc():
    from pipeline.model.retrieval import recalls, reranked

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1],    # query 0: ITC top 3 = 0, 1, 2
                           [0.2, 0.6, 0.5, 0.4]])   # query 1: ITC top 3 = 1, 2, 3
    top = scores.topk(3, dim=1).indices
    score = torch.tensor([[0.1, 0.9, 0.9],          # 1 and 2 tie: ITC's order (1 before 2)
                          [0.0, 0.3, 0.8]])
    order = reranked(scores, top, score).argsort(dim=1, descending=True)
    assert order.tolist() == [[1, 2, 0, 3], [3, 2, 1, 0]]
    # texts 0..3 belong to images 1, 0, 0, 1: ITC ranks another image's text first for both images
    right = torch.tensor([1, 0, 0, 1])[None, :] == torch.arange(2)[:, None]
    assert recalls("x", "tr", reranked(scores, top, score), right)["x_tr_r1"] == 1.0   # image 0 -> text 1, 1 -> 3
    assert recalls("x", "tr", scores, right)["x_tr_r1"] == 0.0


def test_toy_imagenet_as_a_folder_and_as_a_clip_benchmark_webdataset(toyweb, tiny_model, tmp_path):
    model, tok = tiny_model
    imagenet = next(b for b in toyweb.benchmarks if b["format"] == "imagefolder")
    templates = tuple(imagenet["templates"])
    folder = run_benchmark(_bench(name="in", format="imagefolder", path=imagenet["path"], templates=templates),
                           model, tok, "cpu", 16)
    classes = sorted(p.name for p in (toyweb.folder / "imagenet").iterdir())
    assert folder["images"] == 40 and folder["classes"] == len(classes) > 5
    assert 0 <= folder["top1"] <= folder["top5"] <= 1

    root = tmp_path / "wds"
    samples = [{"__key__": f"s{n:05d}", "jpg": f.read_bytes(), "cls": str(c).encode()}
               for n, (c, f) in enumerate((c, f) for c, name in enumerate(classes)
                                          for f in sorted((toyweb.folder / "imagenet" / name).iterdir()))]
    write_shard(root / "test" / "0.tar", iter(samples))
    root.joinpath("classnames.txt").write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    root.joinpath("zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates))
    wds = run_benchmark(_bench(name="in", format="wds", path=str(root)), model, tok, "cpu", 16)
    assert wds == folder
    # WordNet-id folders take their names from a classnames file, in the folders' sorted order
    (tmp_path / "names.txt").write_text("\n".join(c.replace("_", " ") for c in classes))
    named = run_benchmark(_bench(name="in", format="imagefolder", path=imagenet["path"], templates=templates,
                                 classnames=str(tmp_path / "names.txt")), model, tok, "cpu", 16)
    assert named == folder


def test_a_missing_image_or_folder_is_a_clear_error(toyweb, tiny_model, tmp_path):
    from pipeline.errors import InputError

    model, tok = tiny_model
    coco = next(b for b in toyweb.benchmarks if b["format"] == "karpathy")
    shutil.copy(coco["path"], tmp_path / "k.json")   # the image folder is not beside this copy
    with pytest.raises(InputError, match="not found under"):
        run_benchmark(_bench(name="c", format="karpathy", path=str(tmp_path / "k.json")), model, tok, "cpu", 16)
    with pytest.raises(InputError, match="no class folders"):
        run_benchmark(_bench(name="i", format="imagefolder", path=str(tmp_path)), model, tok, "cpu", 16)


def test_training_copies_of_benchmark_images_are_dropped_whatever_the_layout(tmp_path, toyweb, reference_run):
    """A user's benchmark images that also sit in the web data: an exact copy in a Karpathy COCO, a
    re-encoded smaller copy in an ImageNet-style folder, an exact copy in a CLIP_benchmark webdataset.
    prefilter drops the web samples that show them as `eval_contaminated`, and nothing else new."""
    import io
    import re
    import urllib.request

    import numpy as np
    import pyarrow.parquet as pq
    import webdataset as wds
    from conftest import load_config, write_config
    from PIL import Image

    from pipeline import runner
    from pipeline.ledger import not_kept

    def samples(stage):
        return list(wds.WebDataset(str(reference_run.stage(stage).path / "{00000..00005}.tar"), shardshuffle=False))

    truth = {r["index"]: r for r in pq.read_table(toyweb.truth).to_pylist()}
    index = {s["__key__"]: int(re.search(r"/(\d+)\.jpg$", json.loads(s["json"])["url"]).group(1))
             for s in samples("download")}   # key -> the toy web's URL index
    kept = samples("prefilter")
    # three kept samples with pictures not shown elsewhere in the kept data, far apart in the list
    pictures = [truth[index[s["__key__"]]]["image_of"] for s in kept]
    chosen = [s for s in kept if pictures.count(truth[index[s["__key__"]]]["image_of"]) == 1][::40][:3]
    originals = [urllib.request.urlopen(json.loads(s["json"])["url"], timeout=10).read() for s in chosen]

    def noise(seed):   # a picture no web sample shows
        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(seed).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    files = {"images/leak.jpg": originals[0], "images/other.jpg": noise(1)}
    for name, data in files.items():
        (coco / name).write_bytes(data)
    (coco / "test.json").write_text(json.dumps([{"image": name, "caption": ["a picture"] * 5} for name in files]))
    folder = tmp_path / "imagenet"
    for cls, data in (("leaks", originals[1]), ("others", noise(2))):
        with Image.open(io.BytesIO(data)) as img:   # a smaller, re-encoded copy: a near copy
            (folder / cls).mkdir(parents=True)
            img.convert("RGB").resize((img.width * 9 // 10, img.height * 9 // 10)).save(folder / cls / "0.jpg", quality=80)
    shards = tmp_path / "wds" / "test"
    shards.mkdir(parents=True)
    (shards.parent / "classnames.txt").write_text("leak\nother\n")
    with wds.TarWriter(str(shards / "0.tar")) as sink:
        for i, data in enumerate((noise(3), originals[2])):
            sink.write({"__key__": f"{i:04d}", "jpg": data, "cls": str(i).encode()})

    benchmarks = [{"name": "coco", "format": "karpathy", "path": str(coco / "test.json")},
                  {"name": "imagenet", "format": "imagefolder", "path": str(folder)},
                  {"name": "wds", "format": "wds", "path": str(shards.parent)}]
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    cfg = write_config(tmp_path / "c.yaml", toyweb, evaluate={"benchmarks": benchmarks})
    runner.execute(load_config(cfg), run_dir)   # new benchmarks: a new prefilter input, the stage rebuilds
    before = {r["key"]: r["reason"] for r in not_kept(reference_run.stage("prefilter").path)}
    after = {r["key"]: r["reason"] for r in not_kept(run_dir / "round-0" / "prefilter")}
    assert all(after.get(s["__key__"]) == "eval_contaminated" for s in chosen), [after.get(s["__key__"]) for s in chosen]
    new = {k for k, reason in after.items() if reason == "eval_contaminated" and before.get(k) != "eval_contaminated"}
    leaked = {truth[index[s["__key__"]]]["image_of"] for s in chosen}
    assert {truth[index[k]]["image_of"] for k in new} == leaked, "only copies of the three leaked pictures"
    # the ledger names the benchmark image each copies: its path under the benchmark's images, or <tar>/<key>
    rows = {r["key"]: r for r in not_kept(run_dir / "round-0" / "prefilter")}
    assert [(rows[s["__key__"]]["benchmark"], rows[s["__key__"]]["item"]) for s in chosen] == \
        [("coco", "images/leak.jpg"), ("imagenet", "leaks/0.jpg"), ("wds", "0.tar/0001")]
    distances = [rows[s["__key__"]]["distance"] for s in chosen]
    assert distances[0] == distances[2] == 0 and 0 <= distances[1] <= 0.1, distances   # exact, near, exact
