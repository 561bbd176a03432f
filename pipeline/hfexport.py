"""`vlp export MODEL_DIR --format hf OUT`: a vlp model folder as a Hugging Face model folder that
`AutoModel.from_pretrained(OUT, trust_remote_code=True)`, `AutoTokenizer` and `AutoImageProcessor` load.

No BEiT-3 / VLMo class exists in transformers, so the folder carries its modelling code, as remote-code
models do: the model package's own multiway.py and config.py (torch only; the same code vlp trains and
evaluates with) and two small adapters (pipeline/hf_template/). The weights are vlp's, renamed under
`multiway.`; the tokenizer is the model's; the image processor resizes and normalises as vlp's loader.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from pipeline.errors import InputError
from pipeline.fsutil import atomic_path
from pipeline.storage import as_path

TEMPLATE = Path(__file__).parent / "hf_template"
MODEL_CODE = Path(__file__).parent / "model"
AUTO_MAP = {"AutoConfig": "configuration_vlp.VlpMultiwayConfig", "AutoModel": "modeling_vlp.VlpMultiwayModel"}


def export_hf(model_dir: str, out: str) -> Path:
    """Write the HF folder `out` (atomically; an existing folder is an error, not overwritten)."""
    from safetensors.torch import save_file

    from pipeline.modelio import load_pretrained

    target = as_path(out)
    if target.exists():
        raise InputError(f"{target}: exists; export writes a new folder (remove it or pick another name)")
    model, tokenizer, info = load_pretrained(model_dir)
    cfg = model.cfg
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        state = {f"multiway.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("configuration_vlp.py", "modeling_vlp.py"):
            shutil.copyfile(TEMPLATE / name, tmp / name)
        for name in ("multiway.py", "config.py"):
            shutil.copyfile(MODEL_CODE / name, tmp / name)
        config = {"model_type": "vlp_multiway", "architectures": ["VlpMultiwayModel"], "auto_map": AUTO_MAP,
                  "multiway": asdict(cfg), "dtype": "float32",
                  "vlp": {k: info[k] for k in ("fingerprint", "parameters") if k in info}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # truncation=True must cut a caption to what the model's text positions hold (the saved
        # tokenizer said 1e30, and a 57-token caption failed with a shape error)
        tokenizer.model_max_length = cfg.max_text_len
        tokenizer.save_pretrained(str(tmp))
        (tmp / "preprocessor_config.json").write_text(json.dumps(_image_processor(cfg.image_size), indent=2) + "\n")
        _readable(tmp)
    return target


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

