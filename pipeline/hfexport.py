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
from pipeline.hfcard import model_card
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
