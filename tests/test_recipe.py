"""The pieces of the training recipe the demo relies on: conv stem, [CLS] from the patches, the bag-of-
words objective, the queue of ITM negatives, the filter's calibrated rule, the linear probe, and the
loader's held-out share. Exact checks on CPU, no Ray."""

import pytest
import torch

from stages.pretrain.config import OBJECTIVES
from pipeline.data.loader import in_holdout
from pipeline.model import SIZES, MultiwayTransformer
from pipeline.model.multiway import sincos_2d
from pipeline.model.objectives import (LOSSES, Batch, SpecialTokens, TextQueue, _Shared, bag_of_words_loss,
                                       hard_negatives, pretrain_losses)
from pipeline.model.scoring import Calibration, match_scores
from pipeline.probe import probe_accuracy

SPECIAL = SpecialTokens(pad=0, cls=2, sep=3, mask=4)
CFG = SIZES["tiny"]  # conv stem, [CLS] from the patches


def _batch(b=6, cfg=CFG, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
    ids[:, 0], ids[:, 6], ids[:, 7:] = SPECIAL.cls, SPECIAL.sep, SPECIAL.pad
    mask = (ids != SPECIAL.pad).long()
    return Batch(torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g), ids, mask)


def test_conv_stem_keeps_the_token_grid_and_its_batchnorm_state_round_trips():
    cfg = SIZES["demo"]
    assert (cfg.stem, cfg.image_size, cfg.patch_size, cfg.num_patches) == ("conv", 64, 16, 16)
    torch.manual_seed(0)
    model = MultiwayTransformer(cfg)
    model.train()
    model("encode_image", torch.randn(4, 3, 64, 64))  # moves the BatchNorm running statistics
    state = model.state_dict()
    assert any(k.endswith("running_mean") for k in state), "BatchNorm buffers are part of the weights"
    copy = MultiwayTransformer(cfg)
    copy.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), copy.eval()
    assert torch.equal(model("encode_image", x)[1], copy("encode_image", x)[1])
    with pytest.raises(ValueError, match="power of 2"):
        cfg.replace(patch_size=12, image_size=48)


def test_cls_starts_as_the_mean_of_the_patch_tokens():
    torch.manual_seed(0)
    model = MultiwayTransformer(CFG).eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = model("embed_image", images)
    patches = model.patch_embed(images).flatten(2).transpose(1, 2)
    expected = model.image_cls[0, 0] + patches.mean(1) + model.image_pos[0, 0] + model.type_embed.weight[0]
    assert torch.allclose(tokens[:, 0], expected, atol=1e-6)


def test_embedding_once_gives_what_every_mode_computes_itself():
    torch.manual_seed(0)
    model = MultiwayTransformer(CFG).eval()
    b = _batch()
    tokens = model("embed_image", b.images)
    assert torch.equal(model("encode_image", tokens, embedded=True)[1], model("encode_image", b.images)[1])
    assert torch.equal(model("fuse", tokens, b.ids, b.mask, embedded=True), model("fuse", b.images, b.ids, b.mask))


def test_sincos_positions_tell_every_patch_apart():
    code = sincos_2d(4, 32)
    assert code.shape == (16, 32)
    distances = torch.cdist(code, code) + torch.eye(16) * 1e9
    assert distances.min() > 0.1


def test_bag_of_words_loss_is_lowest_for_the_caption_words():
    b = _batch(b=2)
    vocab = CFG.vocab_size

    class Decoder(torch.nn.Module):  # lm_logits returns given logits: isolates the loss
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, mode, hidden):
            return self.logits[:, None]

    words = torch.zeros(2, vocab)
    for i in range(2):
        for t in b.ids[i][b.mask[i].bool()]:
            if int(t) not in (SPECIAL.cls, SPECIAL.sep):
                words[i, t] = 1
    right = bag_of_words_loss(Decoder(words * 20 - 10), torch.zeros(2, 1), b, SPECIAL)
    wrong = bag_of_words_loss(Decoder(words.flip(0) * 20 - 10), torch.zeros(2, 1), b, SPECIAL)
    assert right < 0.01 * vocab and wrong > 10 * right


def test_queue_keeps_the_newest_texts_and_round_trips():
    q = TextQueue(5)
    for n in range(3):
        q.push(torch.full((2, 4), float(n)), torch.full((2, 3), n), torch.ones(2, 3, dtype=torch.long))
    assert len(q) == 5 and q.ids[:, 0].tolist() == [2, 2, 1, 1, 0]  # newest first, oldest dropped
    copy = TextQueue(1)
    copy.load_state_dict(q.state_dict())
    assert copy.size == 5 and torch.equal(copy.feats, q.feats)


def test_queued_negatives_are_never_the_pairs_own_text():
    b = _batch(b=4)
    queued_ids = torch.cat([b.ids, b.ids])  # the queue holds copies of this batch's own texts ...
    queued_sim = torch.full((4, 8), 50.0)   # ... and rates them far above anything else
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg_text, neg_image = hard_negatives(torch.zeros(4, 4), b.ids, 0, 4, g, 0.0, queued_sim, queued_ids)
        candidates = torch.cat([b.ids, queued_ids])
        for i in range(4):
            assert not torch.equal(candidates[neg_text[i]], b.ids[i])
            assert int(neg_image[i]) != i


def test_pretrain_losses_with_bow_and_queue_give_gradients_everywhere_used():
    torch.manual_seed(0)
    model = MultiwayTransformer(CFG)
    queue = TextQueue(16)
    weights = {"itc": 1.0, "itm": 1.0, "lm": 1.0, "bow": 1.0}
    for seed in range(3):  # the queue fills, then supplies negatives
        model.zero_grad()
        out = pretrain_losses(model, _batch(seed=seed), SPECIAL, weights, torch.Generator().manual_seed(seed),
                              0.5, queue)
        out["loss"].backward()
    assert len(queue) == 16 and {"itc", "itm", "lm", "bow"} <= set(out)
    assert model.patch_embed.convs[0].weight.grad.abs().sum() > 0
    assert model.itm_head.weight.grad.abs().sum() > 0


def _queue_of(b: Batch, others: Batch, img: torch.Tensor) -> TextQueue:
    """A queue of the batch's own captions and six others, whose stored (stale) features rate for image j
    (`img`: orthonormal rows) its own caption 1, other caption j 0.9, other caption 4 (j = 0 only) 0.95."""
    near = torch.cat([0.9 * img, 0.95 * img[:1] - 0.5 * img[1:2]])
    queue = TextQueue(16)
    queue.push(torch.cat([img, near, -img[:1]]), torch.cat([b.ids, others.ids]), torch.cat([b.mask, others.mask]))
    return queue


def test_itc_hard_negatives_are_each_images_closest_other_caption_encoded_afresh():
    torch.manual_seed(0)
    model = MultiwayTransformer(CFG).eval()
    b, others = _batch(b=4), _batch(b=6, seed=1)
    img = torch.linalg.qr(torch.randn(CFG.embed_dim, 4))[0].t()   # four orthonormal image features
    own = 0.92 * img   # each image's own caption's feature now: they rate it 0.92
    shared = _Shared(model, b, SPECIAL, None, 0.0, _queue_of(b, others, img), False, itc_hard=1)
    with torch.no_grad():
        _, fresh = model("encode_text", others.ids[:4], others.mask[:4])
    # caption j for image j, encoded now (not the stored features); never the image's own caption, nor
    # caption 4, which image 0 rates above its own caption (0.95 > 0.92)
    assert torch.allclose(shared.hard_texts(img, own), fresh, atol=1e-6)
    # an image that rates every other caption above its own gets a neutral (zero) negative
    low = own.clone()
    low[3] = -2 * img[3]
    got = shared.hard_texts(img, low)
    assert torch.allclose(got[:3], fresh[:3], atol=1e-6) and not got[3].any()
    queue = _queue_of(b, others, img)
    with_hard = pretrain_losses(model, b, SPECIAL, {"itc": 1.0}, None, 0.0, queue, itc_hard=1)["itc"]
    without = pretrain_losses(model, b, SPECIAL, {"itc": 1.0}, None, 0.0, _queue_of(b, others, img))["itc"]
    assert with_hard > without   # more negatives in every image's softmax
    assert len(queue) == 14      # the batch's texts still join the queue


def test_itc_hard_negatives_need_a_queue():
    from stages.pretrain.config import PretrainConfig

    for bad in ({"itc_hard_negatives": 1}, {"itc_hard_negatives": 1, "text_queue": 64, "queue_in_itc": True},
                {"itc_hard_negatives": -1, "text_queue": 64}):
        with pytest.raises(ValueError, match="itc_hard_negatives"):
            PretrainConfig(**bad)
    assert PretrainConfig(itc_hard_negatives=2, text_queue=64).itc_hard_negatives == 2


def test_calibration_rejects_the_asked_share_of_clean_pairs():
    g = torch.Generator().manual_seed(0)
    itm, itc = torch.randn(4000, generator=g) * 2 + 3, torch.randn(4000, generator=g) * 0.05 + 0.9
    cal = Calibration.fit(itm, itc, 0.05)
    rejected = (cal.combine(itm, itc) < cal.threshold).float().mean().item()
    assert abs(rejected - 0.05) < 0.015
    assert cal.combine(torch.tensor([-5.0]), torch.tensor([0.2])) < cal.threshold  # a mismatch is rejected
    assert Calibration(**cal.to_json()).threshold == pytest.approx(cal.threshold, abs=1e-5)
    with pytest.raises(ValueError, match="at least 10"):
        Calibration.fit(itm[:5], itc[:5], 0.05)


def test_calibration_follows_a_left_skewed_clean_tail():
    # clean pairs the model misreads score low, never high: a tenth of them spread below the rest. A normal
    # fit of every score rejects 3.6% when asked for 3%; the fit of the lower side stays within 0.4 points
    g = torch.Generator().manual_seed(1)
    itm = torch.randn(20000, generator=g) + 3
    misread = torch.rand(20000, generator=g) < 0.1
    itm = torch.where(misread, 3 - torch.randn(20000, generator=g).abs() * 3, itm)
    itc = torch.randn(20000, generator=g) * 0.05 + 0.9
    cal = Calibration.fit(itm, itc, 0.03)
    rejected = (cal.combine(itm, itc) < cal.threshold).float().mean().item()
    assert abs(rejected - 0.03) < 0.004


def test_the_objective_table_names_the_model_losses_in_their_order():
    assert list(OBJECTIVES) == list(LOSSES)
    # a unimodal objective runs on unimodal steps (fusion_every): it must not call the fusion encoder
    model, calls = MultiwayTransformer(CFG), []
    original = model.forward
    model.forward = lambda mode, *a, **k: calls.append(mode) or original(mode, *a, **k)
    for name, fused in OBJECTIVES.items():
        calls.clear()
        pretrain_losses(model, _batch(), SPECIAL, {name: 1.0}, torch.Generator().manual_seed(0), 0.5)
        assert ("fuse" in calls) == fused, name
    with pytest.raises(ValueError, match="unknown objective"):
        pretrain_losses(model, _batch(), SPECIAL, {"clip": 1.0})


def test_match_scores_are_one_per_pair():
    torch.manual_seed(0)
    model = MultiwayTransformer(CFG).eval()
    b = _batch()
    itm, itc = match_scores(model, b.images, b.ids, b.mask)
    assert itm.shape == itc.shape == (6,) and bool((itc.abs() <= 1 + 1e-5).all())


def test_probe_reads_a_linearly_coded_attribute_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = [{"shape": ["circle", "square", "cross"][i % 3], "colour": ["red", "blue"][(i // 3) % 2]}
              for i in range(300)]
    coded = torch.randn(300, 16, generator=g)
    coded[:, 0] += torch.tensor([6.0 * ("circle", "square", "cross").index(lab["shape"]) for lab in labels])
    acc = probe_accuracy(coded, labels)
    assert acc["shape"] > 0.95 and acc["colour"] < 0.7  # colour is not in the features: chance is 0.5
    assert probe_accuracy(coded, [{}] * 300) == {}


def test_holdout_is_a_stable_share_of_keys():
    keys = [f"seed{i:09d}" for i in range(5000)]
    held = [k for k in keys if in_holdout(k, 0.2)]
    assert abs(len(held) / len(keys) - 0.2) < 0.02
    assert held == [k for k in keys if in_holdout(k, 0.2)]
    assert not any(in_holdout(k, 0.0) for k in keys)
