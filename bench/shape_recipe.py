"""How fast does the image encoder learn shape? The demo's step between fusion steps (ITC + BoW) trained
from scratch in one process on a run's round-0 web images, once per recipe variant and seed, then:
a linear probe on the frozen image [CLS] (trained on those images, tested on 500 held out; labels from the
toy web's truth) and ITC retrieval on the run's eval split (right = the same five attributes).

Variants are `+`-joined settings: `bow=W` (BoW's weight; ITC's is 1), `hard=K` (pretrain.itc_hard_negatives
over a queue of 1,024 captions), `t=T` (the temperature it starts from). Prints each variant's figures and
its shape probe's ratio to the first variant's, seed by seed (runs of one recipe differ by ~0.03).

    .venv/bin/python bench/shape_recipe.py --run runs/demo --steps 800 --seeds 0,1 --variants bow=1,bow=3,bow=3+hard=1
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribute_probe import HELD_OUT, frozen_features, load_images, train_heads  # noqa: E402
from pipeline.data.shards import read_shard  # noqa: E402
from pipeline.model import MultiwayTransformer  # noqa: E402
from pipeline.model.objectives import Batch, SpecialTokens, TextQueue, pretrain_losses  # noqa: E402
from pipeline.model.retrieval import retrieval_recalls  # noqa: E402
from pipeline.modelio import load_pretrained  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402
from stages.evaluate.stage import read_eval_set  # noqa: E402


def parse(variant: str) -> dict[str, float]:
    settings = {"bow": 1.0, "hard": 0.0, "t": 0.07}
    for part in variant.split("+"):
        key, _, value = part.partition("=")
        if key not in settings:
            sys.exit(f"unknown setting {key!r} in {variant!r}: use bow=, hard=, t=")
        settings[key] = float(value)
    return settings


def tokenize(tok, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="bow=1,bow=3,bow=3+hard=1")
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = RunDir(args.run).require()
    ref, tok, _ = load_pretrained(run.stage("pretrain", 0).path / "model")   # its config and tokenizer only
    cfg = ref.cfg
    images, labels = load_images(run, cfg.image_size)
    captions = [s["txt"].decode("utf-8", "replace") for tar in sorted(run.stage("prefilter", 0).path.glob("*.tar"))
                for s in read_shard(tar)]
    ids, mask = tokenize(tok, captions, cfg.max_text_len)
    eval_images, eval_captions, eval_labels, _, _ = read_eval_set([str(run.root / "toyweb/eval/00000.tar")], cfg.image_size)
    eval_images = torch.stack(eval_images)
    eval_ids, eval_mask = tokenize(tok, eval_captions, cfg.max_text_len)
    right = torch.tensor([[a == b for b in eval_labels] for a in eval_labels])
    special = SpecialTokens(pad=tok.pad_token_id, cls=tok.cls_token_id, sep=tok.sep_token_id, mask=tok.mask_token_id)
    train = len(images) - HELD_OUT
    print(f"{train} training images, {HELD_OUT} held out for the probe, {len(eval_images)} eval pairs, "
          f"{args.steps} steps of 64, bf16 autocast")
    first: dict[int, float] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in args.variants.split(","):
            v = parse(variant)
            torch.manual_seed(seed)
            model = MultiwayTransformer(cfg)
            with torch.no_grad():
                model.logit_scale.fill_(math.log(1 / v["t"]))
            hard = int(v["hard"])
            queue = TextQueue(1024) if hard else None
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
            generator = torch.Generator().manual_seed(seed)
            weights = {"itc": 1.0, "bow": v["bow"]}
            started = time.time()
            model.train()
            for step in range(1, args.steps + 1):
                for group in optimizer.param_groups:
                    group["lr"] = 5e-4 * min(1.0, step / 50)
                idx = torch.randint(train, (64,), generator=generator)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = pretrain_losses(model, Batch(images[idx], ids[idx], mask[idx]), special, weights, generator,
                                          0.0, queue, itc_hard=hard)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            seconds = time.time() - started
            frozen = frozen_features(model, images)
            torch.manual_seed(0)
            probe, _ = train_heads(lambda x: frozen[x], frozen.shape[1], [], torch.arange(len(images)), labels,
                                   2000, 1e-2, 0)
            with torch.no_grad():
                im = torch.cat([model("encode_image", eval_images[i:i + 250])[1] for i in range(0, len(eval_images), 250)])
                tx = torch.cat([model("encode_text", eval_ids[i:i + 250], eval_mask[i:i + 250])[1]
                                for i in range(0, len(eval_images), 250)])
            found = retrieval_recalls(im @ tx.t(), right, ranks=(1,))   # evaluate's own recall (COCO's tie rule)
            tr1, ir1 = found["itc_tr_r1"], found["itc_ir_r1"]
            first.setdefault(seed, probe["shape"])
            print(f"seed {seed} {variant:<18} {seconds:4.0f} s  probe shape {probe['shape']:.3f} "
                  f"(x{probe['shape'] / first[seed]:.2f})  colour {probe['colour']:.3f}  position {probe['position']:.3f}  "
                  f"eval TR@1 {tr1:.3f} IR@1 {ir1:.3f}", flush=True)


if __name__ == "__main__":
    main()
