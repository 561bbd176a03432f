"""Which attributes of the toy web can the image encoder tell apart? Two ways, in one run:

(a) what pretraining learned: a linear probe per attribute on the *frozen* image features ([CLS]) of
    a run's round-0 model;
(b) what the same architecture can learn at all in a comparable budget: the image encoder trained
    from scratch with direct supervision (one linear head per attribute, cross-entropy), --steps steps.

Both are trained on the run's round-0 web images and scored on 500 held-out ones, against the toy
web's truth (the scene the image shows, whatever its caption says). The filter can only remove a
"wrong attribute" caption for attributes the encoder tells apart, so this bounds the filter's recall.

    .venv/bin/python bench/attribute_probe.py [--run runs/demo] [--steps 800]
    .venv/bin/python bench/attribute_probe.py --run RUN --curve   # (a) at every kept round-0 checkpoint

With --curve: figure vs steps. For each complete round-0 checkpoint, (a) as above and the evaluate
stage's own probe (5-fold over the eval split's 500 images, pipeline/probe.py), side by side.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.loader import decode_image  # noqa: E402
from pipeline.data.shards import read_shard  # noqa: E402
from pipeline.toyweb.world import ATTRIBUTES, CHOICES  # noqa: E402
from pipeline.toyweb.measures import load_truth  # noqa: E402
from pipeline.modelio import load_pretrained  # noqa: E402
from pipeline.model import MultiwayTransformer  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

HELD_OUT = 500
SIZES = [len(CHOICES[a]) for a in ATTRIBUTES]


def load_images(run: RunDir, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    truth = load_truth(run)
    if truth is None:
        sys.exit(f"{run.root}: no toy web truth (toyweb/truth.parquet); this probe needs a toy web run")
    images, labels = [], []
    for tar in sorted(run.stage("prefilter", 0).path.glob("*.tar")):
        for sample in read_shard(tar):
            row = truth[json.loads(sample["json"])["url"]]
            images.append(decode_image(sample["jpg"], image_size, None))
            labels.append([CHOICES[a].index(row[a]) for a in ATTRIBUTES])
    return torch.stack(images), torch.tensor(labels)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    loss, acc, start = logits.new_zeros(()), [], 0
    for i, n in enumerate(SIZES):
        part = logits[:, start:start + n]
        loss = loss + F.cross_entropy(part, labels[:, i])
        acc.append((part.argmax(1) == labels[:, i]).float().mean().item())
        start += n
    return loss, acc


def train_heads(features_of, width: int, encoder_params, images, labels, steps: int, lr: float, seed: int,
                log_every: int = 0):
    """Train one linear head per attribute on `features_of(images)` (and the encoder too, when its
    parameters are given) on the training images; returns held-out accuracy and its history."""
    train = len(images) - HELD_OUT
    head = torch.nn.Linear(width, sum(SIZES))
    optimizer = torch.optim.AdamW(list(encoder_params) + list(head.parameters()), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        idx = torch.randint(train, (64,), generator=generator)
        loss, _ = loss_and_accuracy(head(features_of(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps):
            with torch.no_grad():
                _, acc = loss_and_accuracy(head(features_of(images[train:])), labels[train:])
            history.append({"step": step, **{a: round(v, 3) for a, v in zip(ATTRIBUTES, acc)}})
    with torch.no_grad():
        _, acc = loss_and_accuracy(head(features_of(images[train:])), labels[train:])
    return dict(zip(ATTRIBUTES, acc)), history


def frozen_features(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model("encode_image", images[i:i + 256])[0][:, 0] for i in range(0, len(images), 256)])


def curve(run: RunDir, model, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The probes at every complete round-0 checkpoint (DeepSpeed's module states hold the full weights)."""
    from pipeline.probe import probe_accuracy
    from stages.pretrain.train.checkpoints import complete_checkpoints

    eval_images, eval_labels = [], []
    for tar in sorted((run.root / "toyweb" / "eval").glob("*.tar")):
        for sample in read_shard(tar):
            eval_images.append(decode_image(sample["jpg"], model.cfg.image_size, None))
            eval_labels.append(json.loads(sample["json"])["attributes"])
    eval_images = torch.stack(eval_images)
    print(f"{'step':>6}  (a) probe on web features: shape position  |  evaluate's 5-fold probe: shape position")
    for step, tag in complete_checkpoints(run.stage("pretrain", 0).path / "checkpoints"):
        state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        model.load_state_dict(state)
        frozen = frozen_features(model, images)
        torch.manual_seed(0)
        acc, _ = train_heads(lambda x: frozen[x], frozen.shape[1], [], torch.arange(len(images)), labels, 2000, 1e-2, 0)
        five_fold = probe_accuracy(frozen_features(model, eval_images), eval_labels)
        print(f"{step:>6}  {acc['shape']:>32.3f} {acc['position']:>8.3f}  |  "
              f"{five_fold['shape']:>29.3f} {five_fold['position']:>8.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--curve", action="store_true", help="the probes at every kept round-0 checkpoint")
    args = ap.parse_args()
    run = RunDir(args.run).require()
    model, _, _ = load_pretrained(run.stage("pretrain", 0).path / "model")
    images, labels = load_images(run, model.cfg.image_size)
    if args.curve:
        return curve(run, model, images, labels)
    print(f"{len(images)} round-0 web images ({HELD_OUT} held out), {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")

    with torch.no_grad():  # (a) frozen round-0 features, encoded once
        frozen = torch.cat([model("encode_image", images[i:i + 256])[0][:, 0] for i in range(0, len(images), 256)])
    index = torch.arange(len(images))  # the probe's "images" are row numbers into the frozen features
    torch.manual_seed(0)  # the heads' initial weights: the same figures on every run
    started = time.time()
    pretrained_acc, _ = train_heads(lambda x: frozen[x], frozen.shape[1], [], index, labels, 2000, 1e-2, 0)
    print(f"(a) linear probe on round-0 features ({time.time() - started:.0f} s)")

    torch.manual_seed(0)  # (b) the same architecture from scratch, supervised
    scratch = MultiwayTransformer(model.cfg)
    started = time.time()
    supervised_acc, history = train_heads(lambda x: scratch("encode_image", x)[0][:, 0], model.cfg.width,
                                          scratch.parameters(), images, labels, args.steps, args.lr, 0,
                                          log_every=100)
    seconds = time.time() - started
    print(f"(b) supervised from scratch, {args.steps} steps of 64 ({seconds:.0f} s):")
    for h in history:
        print("    step {step:>5}: ".format(**h) + "  ".join(f"{a} {h[a]:.2f}" for a in ATTRIBUTES))

    print(f"\n{'attribute':<11} {'chance':>6} {'(a) round-0 probe':>17} {'(b) supervised':>14} {'ratio a/b':>9}")
    for a, n in zip(ATTRIBUTES, SIZES):
        print(f"{a:<11} {1 / n:>6.2f} {pretrained_acc[a]:>17.3f} {supervised_acc[a]:>14.3f} "
              f"{pretrained_acc[a] / supervised_acc[a]:>9.2f}")


if __name__ == "__main__":
    main()
