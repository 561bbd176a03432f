"""Hugging Face in and out: a model started from tiny ViT / BEiT / BERT checkpoints that transformers
builds and saves here (nothing downloaded), and `vlp export --format hf` loaded back by transformers.
(A pretraining from such checkpoints: test_tracking.py, whose tracked run starts from them.)"""
import json

import pytest
import torch

from pipeline.errors import InputError
from stages.pretrain.hfinit import init_state
from pipeline.model import SIZES, MultiwayTransformer

TINY = SIZES["tiny"]   # width 32, depth 2, heads 2, mlp 2.0, 32 px, 8 px patches
VISION_DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   image_size=32, patch_size=8)


def _save_random(model, folder, seed: int):
    """Save `model` with weights away from transformers' init (zero biases, unit norms would hide a
    tensor mapped to the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    return model.eval()


def make_vit(folder, **changes):
    from transformers import ViTConfig, ViTModel

    return _save_random(ViTModel(ViTConfig(**{**VISION_DIMS, **changes}), add_pooling_layer=False), folder, 1)


def make_beit(folder, **changes):
    from transformers import BeitConfig, BeitModel

    cfg = BeitConfig(**{**VISION_DIMS, "use_absolute_position_embeddings": True, "use_mean_pooling": False, **changes})
    return _save_random(BeitModel(cfg, add_pooling_layer=False), folder, 2)


def make_bert(folder, captions):
    """A BERT whose vocabulary is a WordPiece trained on `captions`, saved with its tokenizer."""
    from transformers import BertConfig, BertModel

    from pipeline.data.tokenizer import train_tokenizer

    tok = train_tokenizer(captions, 200, folder)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return _save_random(BertModel(cfg, add_pooling_layer=False), folder, 3), tok


CAPTIONS = ["a small red circle on a white background", "a large blue square at the top left",
            "a green triangle in the middle", "two yellow stars"]


BEIT_RELATIVE = {"use_absolute_position_embeddings": False, "use_relative_position_bias": True}   # as VLMo's BEiT
BEIT_SHARED = {"use_absolute_position_embeddings": False, "use_shared_relative_position_bias": True}


@pytest.mark.parametrize("make", [make_vit, make_beit, lambda f: make_beit(f, **BEIT_RELATIVE),
                                  lambda f: make_beit(f, **BEIT_SHARED)],
                         ids=["vit", "beit", "beit-relative", "beit-shared-relative"])
def test_image_features_after_loading_equal_the_hf_models_own(tmp_path, make):
    hf = make(tmp_path / "vision")
    cfg, state = init_state(TINY, str(tmp_path / "vision"), None, seed=0)
    model = MultiwayTransformer(cfg)
    model.load_state_dict(state)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model.eval()("encode_image", images)
        theirs = hf(pixel_values=images).last_hidden_state
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    block = model.blocks[-1]   # every FFN expert, VL included, starts from the vision FFN
    assert torch.equal(block.v_ffn.fc1.weight, block.vl_ffn.fc1.weight)
    assert torch.equal(block.v_ffn.fc1.weight, block.l_ffn.fc1.weight)


def test_a_checkpoints_own_pixel_statistics_are_followed(tmp_path):
    """A ViT whose preprocessor normalises with ImageNet's statistics: fed vlp's (x - 0.5) / 0.5 pixels,
    the model gives what the HF model gives on the same images normalised its way."""
    from transformers import DeiTConfig, DeiTModel

    hf = make_vit(tmp_path / "vision")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    (tmp_path / "vision" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "image_mean": list(mean), "image_std": list(std)}))
    cfg, state = init_state(TINY, str(tmp_path / "vision"), None, seed=0)
    assert cfg.pixel_mean == mean and cfg.pixel_std == std
    model = MultiwayTransformer(cfg)
    model.load_state_dict(state)
    raw = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))   # [0, 1] RGB
    with torch.no_grad():
        ours, _ = model.eval()("encode_image", (raw - 0.5) / 0.5)
        theirs = hf(pixel_values=(raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert (ours - theirs.last_hidden_state).abs().max().item() < 1e-4
    # a DeiT with no preprocessor file: its type's default, ImageNet's
    DeiTModel(DeiTConfig(**VISION_DIMS), add_pooling_layer=False).save_pretrained(str(tmp_path / "deit"))
    assert init_state(TINY, str(tmp_path / "deit"), None, seed=0)[0].pixel_mean == mean


def test_word_embeddings_and_tokenizer_come_from_the_text_checkpoint(tmp_path):
    bert, tok = make_bert(tmp_path / "text", CAPTIONS)
    _, state = init_state(TINY.replace(vocab_size=len(tok)), None, str(tmp_path / "text"), seed=0)
    assert torch.equal(state["token_embed.weight"], bert.embeddings.word_embeddings.weight.detach())
    assert torch.equal(state["text_pos"][0], bert.embeddings.position_embeddings.weight.detach()[:TINY.max_text_len])


def test_a_shape_mismatch_names_the_tensors_and_both_shapes(tmp_path):
    make_vit(tmp_path / "wide-ffn", intermediate_size=96)
    with pytest.raises(InputError) as err:
        init_state(TINY, str(tmp_path / "wide-ffn"), None, seed=0)
    message = str(err.value)
    assert "encoder.layer.0.intermediate.dense.weight (96, 32) -> blocks.0.v_ffn.fc1.weight (64, 32)" in message
    make_bert(tmp_path / "text", CAPTIONS)
    with pytest.raises(InputError, match=r"word_embeddings.weight \(\d+, 32\) -> token_embed.weight \(512, 32\)"):
        init_state(TINY, None, str(tmp_path / "text"), seed=0)   # tiny's 512 tokens, not the tokenizer's


def test_what_the_model_cannot_represent_is_refused_by_name(tmp_path):
    make_beit(tmp_path / "no-positions", use_absolute_position_embeddings=False)
    with pytest.raises(InputError, match="neither absolute nor relative positions"):
        init_state(TINY, str(tmp_path / "no-positions"), None, seed=0)
    make_beit(tmp_path / "both-biases", use_relative_position_bias=True, use_shared_relative_position_bias=True)
    with pytest.raises(InputError, match="one kind of relative position bias"):
        init_state(TINY, str(tmp_path / "both-biases"), None, seed=0)
    make_vit(tmp_path / "four-heads", num_attention_heads=4)
    with pytest.raises(InputError, match="num_attention_heads is 4, the model has 2"):
        init_state(TINY, str(tmp_path / "four-heads"), None, seed=0)


EXPORT_CHECK = """
import json, sys, torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from pipeline.modelio import load_pretrained
model_dir, out = sys.argv[1], sys.argv[2]
hf = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(out)
ours, our_tok, _ = load_pretrained(model_dir)
texts = ["a small red circle at the top left", "a large blue square", "two"]
enc = tok(texts, padding="max_length", truncation=True, max_length=ours.cfg.max_text_len, return_tensors="pt")
assert enc["input_ids"].tolist() == our_tok(texts, padding="max_length", truncation=True,
                                            max_length=ours.cfg.max_text_len, return_tensors="pt")["input_ids"].tolist()
images = torch.randn(4, 3, ours.cfg.image_size, ours.cfg.image_size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out_hf = hf(pixel_values=images, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    image_gap = (hf.get_image_features(images) - ours("encode_image", images)[1]).abs().max().item()
    text_gap = (out_hf.text_embeds - ours("encode_text", enc["input_ids"], enc["attention_mask"])[1]).abs().max().item()
import io, numpy as np
from PIL import Image
from pipeline.data.loader import decode_image
buf = io.BytesIO()
Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")).save(buf, "JPEG")
pixels = processor(Image.open(io.BytesIO(buf.getvalue())), return_tensors="pt")["pixel_values"][0]
pixel_gap = (pixels - decode_image(buf.getvalue(), ours.cfg.image_size, None)).abs().max().item()
print(json.dumps({"image": image_gap, "text": text_gap, "pixels": pixel_gap, "logits": list(out_hf.logits_per_image.shape),
                  "processor": type(processor).__name__}))
"""


def _fresh_python(script: str, *args, modules, **env) -> dict:
    """`script` in a fresh interpreter, offline, with its own cache of remote-code modules (`modules`):
    the JSON of its last line."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export_and_compare(model_dir, tmp_path) -> dict:
    """`vlp export --format hf`, then EXPORT_CHECK in a fresh interpreter: its figures."""
    from conftest import vlp

    vlp("export", str(model_dir), "--format", "hf", str(tmp_path / "hf"))
    return _fresh_python(EXPORT_CHECK, model_dir, tmp_path / "hf", modules=tmp_path / "modules")


def test_an_hf_export_loads_in_transformers_with_the_same_features(tmp_path, trained_run):
    from conftest import vlp

    model_dir = trained_run / "round-0" / "pretrain" / "model"
    result = _export_and_compare(model_dir, tmp_path)
    assert result["image"] < 1e-5 and result["text"] < 1e-5, result
    assert result["pixels"] < 1e-5, "the image processor gives the pixels vlp's loader gives"
    assert result["logits"] == [4, 3] and result["processor"].startswith("ViTImageProcessor")
    again = vlp("export", str(model_dir), "--format", "hf", str(tmp_path / "hf"), check=False)
    assert again.returncode == 2 and "exists" in again.stderr   # never overwrites a folder


def test_an_hf_export_keeps_relative_positions_and_pixel_statistics(tmp_path):
    """What a model started from a BEiT / DeiT carries: its bias tables, and statistics applied in the
    forward. (transformers builds the model on the meta device: a derived buffer came back garbage.)"""
    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.modelio import save_pretrained

    tok = train_tokenizer(CAPTIONS * 5, 200, tmp_path / "tok")
    cfg = TINY.replace(vocab_size=len(tok), rel_pos_bias="layer", pixel_mean=(0.485, 0.456, 0.406),
                       pixel_std=(0.229, 0.224, 0.225))
    torch.manual_seed(0)
    model = MultiwayTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    save_pretrained(tmp_path / "model", cfg, model.state_dict(), tmp_path / "tok", {"pretrain": {"zero_stage": 0}})
    result = _export_and_compare(tmp_path / "model", tmp_path)
    assert result["image"] < 1e-5 and result["text"] < 1e-5, result


def test_an_hf_export_truncates_to_the_model_and_is_readable_by_others(tmp_path):
    """The exported tokenizer's model_max_length is the model's text length, so truncation=True gives
    what the model takes; every file is 0644 (a shared disk, a Hub upload)."""
    from transformers import AutoTokenizer

    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.hfexport import export_hf
    from pipeline.modelio import save_pretrained

    tok = train_tokenizer(CAPTIONS * 5, 200, tmp_path / "tok")
    cfg = TINY.replace(vocab_size=len(tok))
    save_pretrained(tmp_path / "model", cfg, MultiwayTransformer(cfg).state_dict(), tmp_path / "tok",
                    {"pretrain": {"zero_stage": 0}})
    out = export_hf(str(tmp_path / "model"), str(tmp_path / "hf"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.model_max_length == cfg.max_text_len
    long = " ".join(CAPTIONS * 4)
    assert len(loaded(long, truncation=True)["input_ids"]) == cfg.max_text_len


# --- the export as a Hub model: only vlp's code, a model card, a processor, the zero-shot pipeline -------

OWN_CODE = {"configuration_vlp.py", "modeling_vlp.py", "processing_vlp.py", "multiway.py", "config.py"}


def _tiny_model(folder, tokenizer=None, info=None):
    """A tiny random vlp model folder (its tokenizer trained on CAPTIONS, or the folder `tokenizer`)."""
    from pipeline.data.tokenizer import load_tokenizer, train_tokenizer
    from pipeline.modelio import save_pretrained

    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(CAPTIONS * 5, 200, folder / "tok")
    cfg = TINY.replace(vocab_size=len(tok))
    torch.manual_seed(0)
    save_pretrained(folder / "model", cfg, MultiwayTransformer(cfg).state_dict(), tokenizer or folder / "tok",
                    info or {"pretrain": {"zero_stage": 0}})
    return folder / "model"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(vlp model folder, its HF export) of a tiny random model outside any run."""
    from pipeline.hfexport import export_hf

    folder = tmp_path_factory.mktemp("tiny-export")
    model_dir = _tiny_model(folder)
    return model_dir, export_hf(str(model_dir), str(folder / "hf"))


def _auto_map_references(folder) -> list[str]:
    """Every module reference of every auto_map in the folder's JSON files."""
    refs = []
    for path in folder.glob("*.json"):
        for value in (json.loads(path.read_text()).get("auto_map") or {}).values():
            refs += [v for v in (value if isinstance(value, list) else [value]) if v]
    return refs


LOAD_EVERYTHING = """
import json, os, sys
from pathlib import Path
from PIL import Image
from transformers import (AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, AutoTokenizer,
                          pipeline)
out = sys.argv[1]
AutoTokenizer.from_pretrained(out, trust_remote_code=True)
AutoProcessor.from_pretrained(out, trust_remote_code=True)
AutoModel.from_pretrained(out, trust_remote_code=True)
AutoModelForZeroShotImageClassification.from_pretrained(out, trust_remote_code=True)
classify = pipeline("zero-shot-image-classification", model=out, trust_remote_code=True)
classify(Image.new("RGB", (40, 30)), candidate_labels=["a red circle", "a blue square"], hypothesis_template="{}")
modules = sorted({p.name for p in Path(os.environ["HF_MODULES_CACHE"]).rglob("*.py")} - {"__init__.py"})
print(json.dumps({"modules": modules, "planted_imported": "planted_module" in sys.modules}))
"""
PLANTED_MODULE = """import os
open(os.environ["VLP_PLANTED_MARKER"], "w").write("imported")
from transformers import BertTokenizer
class PlantedTokenizer(BertTokenizer):
    pass
"""


def test_an_hf_export_names_no_code_but_vlps(tmp_path, caplog):
    """A source tokenizer whose config names code of its own (a module beside it, and one in another Hub
    repository): the export drops the references with a warning, and loading everything it offers with
    trust_remote_code=True imports vlp's modules only."""
    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.hfexport import export_hf

    tok_dir = tmp_path / "tok"
    train_tokenizer(CAPTIONS * 5, 200, tok_dir)
    (tok_dir / "planted_module.py").write_text(PLANTED_MODULE)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["planted_module.PlantedTokenizer",
                                            "planted--planted_module.PlantedTokenizer"],   # another Hub repo's
                          "AutoProcessor": "planted_module.PlantedProcessor"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    model_dir = _tiny_model(tmp_path, tokenizer=tok_dir)

    out = export_hf(str(model_dir), str(tmp_path / "hf"))
    assert "planted_module.PlantedTokenizer" in caplog.text and "auto_map" in caplog.text
    assert {p.name for p in out.glob("*.py")} == OWN_CODE
    assert not [p.name for p in out.iterdir() if p.suffix != ".safetensors" and "planted" in p.read_text()]
    refs = _auto_map_references(out)
    assert refs and {r.split(".")[0] for r in refs} <= {"configuration_vlp", "modeling_vlp", "processing_vlp"}, refs

    marker = tmp_path / "planted-imported"
    result = _fresh_python(LOAD_EVERYTHING, out, modules=tmp_path / "modules", VLP_PLANTED_MARKER=str(marker),
                           PYTHONPATH=str(tok_dir))   # importable, were anything to import it
    assert set(result["modules"]) == OWN_CODE and not result["planted_imported"], result
    assert not marker.exists()


def test_an_hf_export_removes_a_custom_tokenizers_code(tmp_path, caplog, monkeypatch):
    """A tokenizer of a remote-code class saves its module and an auto_map naming it (transformers'
    custom_object_save): the export removes both."""
    import importlib.util
    import sys

    import pipeline.modelio
    from pipeline.hfexport import export_hf

    model_dir = _tiny_model(tmp_path)
    (tmp_path / "planted_module.py").write_text(PLANTED_MODULE)
    monkeypatch.setenv("VLP_PLANTED_MARKER", str(tmp_path / "imported-here"))   # this test imports it itself
    spec = importlib.util.spec_from_file_location("planted_module", tmp_path / "planted_module.py")
    planted = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "planted_module", planted)
    spec.loader.exec_module(planted)
    planted.PlantedTokenizer.register_for_auto_class("AutoTokenizer")
    load = pipeline.modelio.load_pretrained

    def load_with_custom_tokenizer(folder, device="cpu"):
        model, _, info = load(folder, device)
        return model, planted.PlantedTokenizer.from_pretrained(str(tmp_path / "tok")), info

    monkeypatch.setattr(pipeline.modelio, "load_pretrained", load_with_custom_tokenizer)
    out = export_hf(str(model_dir), str(tmp_path / "hf"))
    assert "removed planted_module.py" in caplog.text and "planted_module.PlantedTokenizer" in caplog.text
    assert {p.name for p in out.glob("*.py")} == OWN_CODE
    assert not [r for r in _auto_map_references(out) if "planted" in r]


def _card(folder) -> tuple[dict, dict[str, list[dict]]]:
    """(YAML front matter, {caption: rows}) of a model card; a table's caption is the line above it."""
    import yaml

    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    tables, caption, lines = {}, None, body.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row[2:-2].split(" | ")))))
            tables[caption] = rows
        elif line.strip() and not line.startswith("|"):
            caption = line.strip()
    return yaml.safe_load(front), tables


def test_an_hf_exports_model_card_says_what_the_run_recorded(tmp_path, trained_run):
    """The card of a run's model: HF's front matter, the URL lists and every stage's counts and
    fingerprint as the manifests hold them, the fingerprints, the evaluation's figures as recorded."""
    from pipeline.fsutil import sha256_file
    from pipeline.hfexport import export_hf
    from pipeline.modelio import read_info
    from pipeline.runs import RunDir

    model_dir = trained_run / "round-0" / "pretrain" / "model"
    out = export_hf(str(model_dir), str(tmp_path / "hf"))
    front, tables = _card(out)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "zero-shot-image-classification"
    assert "vlp" in front["tags"] and "license" not in front   # the run records none

    manifests = {sd.stage: sd.manifest() for sd in RunDir(trained_run).stage_dirs()}
    download = manifests["download"]
    assert tables["URL lists downloaded (round 0):"] == [
        {"list": spec["name"], "format": spec["format"], "file": spec["path"].rsplit("/", 1)[-1], "fingerprint": fp}
        for spec, fp in zip(download.details["lists"], download.inputs)]
    stages = tables["What each stage did with the samples (the most frequent reasons for a drop or failure):"]
    assert [(r["stage"], r["fingerprint"], r["in"], r["kept"], r["dropped"], r["failed"]) for r in stages] == [
        (m.stage, m.fingerprint, str(m.totals.samples_in), str(m.totals.samples_kept),
         str(m.totals.samples_dropped), str(m.totals.samples_failed))
        for m in (manifests[s] for s in ("download", "prefilter", "pretrain"))]
    seed = manifests["pretrain"].details["seed_samples"]
    assert f"Pretraining also used {seed} samples" in (out / "README.md").read_text()

    fingerprints = {r["what"]: r["value"] for r in tables["## Fingerprints"]}
    weights = sha256_file(model_dir / "model.safetensors")
    assert fingerprints["weights (sha256 of the model folder's model.safetensors)"] == weights
    assert fingerprints["training stage (its config and inputs)"] == read_info(model_dir)["fingerprint"] \
        == manifests["pretrain"].fingerprint
    assert f"prefilter (round 0) {manifests['prefilter'].fingerprint}" in fingerprints["training stage's inputs"]
    assert fingerprints["evaluation stage"] == manifests["evaluate"].fingerprint

    metrics = manifests["evaluate"].details["metrics"]
    figures = lambda caption: {r["figure"]: r["value"] for r in tables[caption]}   # noqa: E731
    recorded = lambda group: {k: v if isinstance(v, str) else json.dumps(v) for k, v in group.items()}   # noqa: E731
    assert figures("Held-out split:") == recorded({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    assert figures("attribute_probe:") == recorded(metrics["attribute_probe"])
    assert metrics["benchmarks"]
    for name, group in metrics["benchmarks"].items():
        assert figures(f"benchmarks, {name}:") == recorded(group)


def test_a_model_card_outside_its_run_claims_no_run_and_names_a_known_license(tmp_path, tiny_export):
    """A model folder that is not its run's export: the card says the run's records are not there (no
    figures); a checkpoint it started from with a license in its card gives the export that license."""
    from pipeline.hfexport import export_hf

    front, tables = _card(tiny_export[1])
    text = (tiny_export[1] / "README.md").read_text()
    assert "license" not in front and "No license is recorded" in text
    assert "## Evaluation\n\nNot recorded here" in text and "## Training data\n\nNot recorded here" in text
    assert set(tables) == {"## Fingerprints"}

    vision = tmp_path / "vit"
    make_vit(vision)
    (vision / "README.md").write_text("---\nlicense: apache-2.0\ntags: [vision]\n---\n# a ViT\n")
    model_dir = _tiny_model(tmp_path, info={"pretrain": {"init_from": {"vision": str(vision), "text": None}}})
    front, _ = _card(export_hf(str(model_dir), str(tmp_path / "hf")))
    assert front["license"] == "apache-2.0"


PROCESSOR_CHECK = """
import io, json, sys, torch, numpy as np
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForZeroShotImageClassification, AutoProcessor
from pipeline.data.loader import decode_image
from pipeline.modelio import load_pretrained
model_dir, out = sys.argv[1], sys.argv[2]
ours, tok, _ = load_pretrained(model_dir)
processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(out)
model = AutoModelForZeroShotImageClassification.from_pretrained(out, trust_remote_code=True).eval()
jpegs = []
for seed, shape in ((0, (40, 56, 3)), (1, (64, 48, 3))):
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(*shape) * 255).astype("uint8")).save(buf, "JPEG")
    jpegs.append(buf.getvalue())
images = [Image.open(io.BytesIO(b)) for b in jpegs]
texts = ["a small red circle", "two yellow stars", " ".join(["a large blue square at the top left"] * 4)]
inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits_per_image
    pixels = torch.stack([decode_image(b, ours.cfg.image_size, None) for b in jpegs])
    enc = tok(texts, padding=True, truncation=True, max_length=ours.cfg.max_text_len, return_tensors="pt")
    text = ours("encode_text", enc["input_ids"], enc["attention_mask"])[1]
    theirs = ours("itc_scale") * ours("encode_image", pixels)[1] @ text.t()
print(json.dumps({"keys": sorted(inputs.keys()), "ids": inputs["input_ids"].tolist() == enc["input_ids"].tolist(),
                  "pixels": (inputs["pixel_values"] - pixels).abs().max().item(),
                  "logits": list(logits.shape), "logit_gap": (logits - theirs).abs().max().item(),
                  "image_processor": [dict(image_processor.size), list(image_processor.image_mean),
                                      list(image_processor.image_std)],
                  "processor": type(processor).__name__}))
"""


def test_the_exports_processor_gives_what_the_model_takes(tmp_path, tiny_export):
    """AutoProcessor on captions (one longer than the model's text positions) and pictures: ids as vlp's
    tokenizer gives them, pixels as vlp's loader gives them, and the model's logits equal vlp's."""
    model_dir, out = tiny_export
    result = _fresh_python(PROCESSOR_CHECK, model_dir, out, modules=tmp_path / "modules")
    assert result["processor"] == "VlpMultiwayProcessor"
    assert {"input_ids", "attention_mask", "pixel_values"} <= set(result["keys"]), result
    assert result["ids"] and result["pixels"] < 1e-5, result
    assert result["logits"] == [2, 3] and result["logit_gap"] < 1e-4, result
    assert result["image_processor"] == [{"height": TINY.image_size, "width": TINY.image_size}, [0.5] * 3, [0.5] * 3]


PIPELINE_CHECK = """
import io, json, sys, torch, numpy as np
from PIL import Image
from transformers import pipeline
from pipeline.data.loader import decode_image
from pipeline.modelio import load_pretrained
model_dir, out = sys.argv[1], sys.argv[2]
ours, tok, _ = load_pretrained(model_dir)
classify = pipeline("zero-shot-image-classification", model=out, trust_remote_code=True)
buf = io.BytesIO()
Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")).save(buf, "PNG")
labels = ["a red circle", "a blue square", "a green triangle"]
found = classify(Image.open(io.BytesIO(buf.getvalue())), candidate_labels=labels, hypothesis_template="{}")
with torch.no_grad():
    enc = tok(labels, padding=True, return_tensors="pt")
    image = ours("encode_image", decode_image(buf.getvalue(), ours.cfg.image_size, None)[None])[1]
    text = ours("encode_text", enc["input_ids"], enc["attention_mask"])[1]
    probs = (ours("itc_scale") * image @ text.t()).softmax(-1)[0]
try:
    classify(Image.open(io.BytesIO(buf.getvalue())), candidate_labels=[" ".join(labels * 3)])
    too_long = None
except ValueError as err:
    too_long = str(err)
print(json.dumps({"found": found, "ours": dict(zip(labels, probs.tolist())), "too_long": too_long}))
"""


def test_the_zero_shot_pipeline_classifies_with_an_export(tmp_path, tiny_export):
    """transformers' zero-shot-image-classification pipeline on a PIL image: every label scored, the
    scores summing to 1 and equal to the softmax of vlp's own logits; a label the model cannot hold
    is an error that says what to do."""
    model_dir, out = tiny_export
    result = _fresh_python(PIPELINE_CHECK, model_dir, out, modules=tmp_path / "modules")
    scores = {r["label"]: r["score"] for r in result["found"]}
    assert set(scores) == set(result["ours"]) and abs(sum(scores.values()) - 1) < 1e-5, result
    assert max(abs(scores[k] - v) for k, v in result["ours"].items()) < 1e-5, result
    assert result["too_long"] and "truncation=True" in result["too_long"], result
