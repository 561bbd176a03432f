"""Hugging Face in and out: a model started from tiny ViT / BEiT / BERT checkpoints that transformers
builds and saves here (nothing downloaded), and `vlp export --format hf` loaded back by transformers.
(A pretraining from such checkpoints: test_tracking.py, whose tracked run starts from them.)"""
import json

import pytest
import torch

from pipeline.errors import InputError
from pipeline.hfinit import init_state
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


def _export_and_compare(model_dir, tmp_path) -> dict:
    """`vlp export --format hf`, then EXPORT_CHECK in a fresh interpreter: its figures."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, vlp

    vlp("export", str(model_dir), "--format", "hf", str(tmp_path / "hf"))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(model_dir), str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, stdin=subprocess.DEVNULL,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
