"""The Multiway Transformer and its objectives, on CPU, with exact checks."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model import SIZES, MultiwayTransformer, count_parameters
from pipeline.model.generate import generate
from pipeline.model.objectives import Batch, SpecialTokens, hard_negatives, itc_loss, pretrain_losses

CFG = SIZES["tiny"]
SPECIAL = SpecialTokens(pad=0, cls=2, sep=3, mask=4)


def _batch(b=4, seed=0, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
    ids[:, 0] = SPECIAL.cls
    mask = torch.ones_like(ids)
    for i in range(b):  # varied lengths, [SEP] then padding
        n = 4 + i % (cfg.max_text_len - 4)
        ids[i, n] = SPECIAL.sep
        ids[i, n + 1:] = SPECIAL.pad
        mask[i, n + 1:] = 0
    return Batch(images, ids, mask)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultiwayTransformer(CFG).eval()


def test_shapes(model):
    b = _batch()
    hidden, feat = model("encode_image", b.images)
    assert hidden.shape == (4, 1 + CFG.num_patches, CFG.width) and feat.shape == (4, CFG.embed_dim)
    assert torch.allclose(feat.norm(dim=-1), torch.ones(4))
    hidden, feat = model("encode_text", b.ids, b.mask)
    assert hidden.shape == (4, CFG.max_text_len, CFG.width) and feat.shape == (4, CFG.embed_dim)
    fused = model("fuse", b.images, b.ids, b.mask)
    assert fused.shape == (4, CFG.max_text_len, CFG.width)
    assert model("itm_logits", fused).shape == (4, 2)
    assert model("lm_logits", fused).shape == (4, CFG.max_text_len, CFG.vocab_size)


def test_named_sizes_match_vlmo_parameter_counts():
    for name, published in (("base", 175e6), ("large", 562e6)):
        with torch.device("meta"):
            n = count_parameters(MultiwayTransformer(SIZES[name]))
        assert abs(n - published) / published < 0.02, (name, n)


def test_vl_ffn_only_in_the_top_blocks():
    cfg = SIZES["tiny"].replace(depth=4, vl_layers=2)
    m = MultiwayTransformer(cfg)
    assert [blk.vl_ffn is not None for blk in m.blocks] == [False, False, True, True]


def _record_expert_inputs(model):
    seen = []
    hooks = [getattr(blk, name).register_forward_hook(
        lambda mod, inp, out, i=i, name=name: seen.append((i, name, inp[0].shape[1])))
        for i, blk in enumerate(model.blocks) for name in ("v_ffn", "l_ffn", "vl_ffn") if getattr(blk, name)]
    return seen, hooks


def test_tokens_reach_the_expert_of_their_modality(model):
    b = _batch()
    n_img, n_txt = 1 + CFG.num_patches, CFG.max_text_len
    for mode, args, expected in (
        ("encode_image", (b.images,), [(0, "v_ffn", n_img), (1, "v_ffn", n_img)]),
        ("encode_text", (b.ids, b.mask), [(0, "l_ffn", n_txt), (1, "l_ffn", n_txt)]),
        ("fuse", (b.images, b.ids, b.mask), [(0, "v_ffn", n_img), (0, "l_ffn", n_txt), (1, "vl_ffn", n_img + n_txt)]),
    ):
        seen, hooks = _record_expert_inputs(model)
        model(mode, *args)
        for h in hooks:
            h.remove()
        assert seen == expected, mode
    # the routing is real: changing V-FFN weights changes image features and leaves text features alone
    other = MultiwayTransformer(CFG).eval()
    other.load_state_dict(model.state_dict())
    # a random change, not a constant: a constant added to fc2's weight shifts every channel of a token
    # by the same amount, which the next pre-norm LayerNorm removes exactly (the features would not move)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in other.blocks:
            blk.v_ffn.fc2.weight.add_(0.5 * torch.randn(blk.v_ffn.fc2.weight.shape, generator=g))
    assert not torch.allclose(other("encode_image", b.images)[1], model("encode_image", b.images)[1])
    assert torch.allclose(other("encode_text", b.ids, b.mask)[1], model("encode_text", b.ids, b.mask)[1])


def test_captioner_mask_leaks_no_future_text(model):
    b = _batch()
    out = model("fuse", b.images, b.ids, b.mask, causal=True)
    for t in (3, 7, CFG.max_text_len - 2):
        changed = b.ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 17) % CFG.vocab_size
        out2 = model("fuse", b.images, changed, b.mask, causal=True)
        assert torch.allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6)
        assert not torch.allclose(out[:, t + 1:], out2[:, t + 1:])
    # while the fusion encoder is bidirectional: the same change reaches earlier positions
    changed = b.ids.clone()
    changed[:, 3] = (changed[:, 3] + 17) % CFG.vocab_size
    f1 = model("fuse", b.images, b.ids, b.mask)
    f2 = model("fuse", b.images, changed, b.mask)
    assert not torch.allclose(f1[:, :3], f2[:, :3])


def test_kv_cache_generation_equals_recomputation(model):
    b = _batch()
    prompt = b.ids[:, :2]
    kw = dict(sep_id=SPECIAL.sep, pad_id=SPECIAL.pad, max_len=CFG.max_text_len, min_len=3, top_p=None,
              repetition_penalty=1.3)
    with_cache = generate(model, b.images, prompt, use_cache=True, **kw)
    without = generate(model, b.images, prompt, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    assert with_cache.shape[1] > 2 and torch.equal(with_cache[:, :2], prompt)
    sampled = generate(model, b.images, prompt, top_p=0.9, generator=torch.Generator().manual_seed(1),
                       **{k: v for k, v in kw.items() if k != "top_p"})
    assert sampled.shape[0] == 4


def test_all_objectives_give_finite_losses_and_gradients():
    torch.manual_seed(0)
    m = MultiwayTransformer(CFG)
    out = pretrain_losses(m, _batch(8), SPECIAL, {"itc": 1, "itm": 1, "mlm": 1, "lm": 1},
                          torch.Generator().manual_seed(0))
    assert set(out) >= {"itc", "itm", "mlm", "lm", "loss"}
    out["loss"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"logit_scale", "itm_head.weight", "lm_bias", "blocks.1.vl_ffn.fc1.weight", "blocks.0.v_ffn.fc1.weight",
            "blocks.0.l_ffn.fc1.weight"} <= grads


@pytest.mark.parametrize("rel_pos", ["shared", "layer"])
def test_relative_position_bias_trains_and_generates_with_the_cache(rel_pos):
    """BEiT's relative position bias (image-image attention only): every objective reaches its tables,
    and captioning with the KV cache (the bias in the prefill, none after) equals recomputing."""
    torch.manual_seed(0)
    m = MultiwayTransformer(CFG.replace(rel_pos_bias=rel_pos))
    with torch.no_grad():   # away from zero, so that a bias that went missing would show
        for name, p in m.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 1.0)
    out = pretrain_losses(m, _batch(8), SPECIAL, {"itc": 1, "itm": 1, "mlm": 1, "lm": 1},
                          torch.Generator().manual_seed(0))
    out["loss"].backward()
    tables = [p for n, p in m.named_parameters() if n.endswith("rel_pos.table")]
    assert len(tables) == (1 if rel_pos == "shared" else CFG.depth)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables)
    b = _batch()
    kw = dict(sep_id=SPECIAL.sep, pad_id=SPECIAL.pad, max_len=CFG.max_text_len, min_len=3, top_p=None)
    m.eval()
    assert torch.equal(generate(m, b.images, b.ids[:, :2], use_cache=True, **kw),
                       generate(m, b.images, b.ids[:, :2], use_cache=False, **kw))


def test_hard_negatives_never_pick_the_positive_or_an_identical_caption():
    g = torch.Generator().manual_seed(0)
    n = 16
    sim = torch.eye(n) * 50 + torch.randn(n, n, generator=g)  # the positive is by far the most similar
    ids = torch.arange(n)[:, None].repeat(1, 5)
    ids[5] = ids[6]  # two pairs share a caption: neither may be the other's negative
    for _ in range(50):
        neg_t, neg_i = hard_negatives(sim, ids, offset=0, local=n, generator=g)
        rows = torch.arange(n)
        assert (neg_t != rows).all() and (neg_i != rows).all()
        assert neg_t[5] != 6 and neg_t[6] != 5 and neg_i[5] != 6 and neg_i[6] != 5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _itc_rank(rank, world, port, x_img, x_txt, enc_img, enc_txt, scale, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per = x_img.shape[0] // world
    params = [p.clone().requires_grad_(True) for p in (enc_img, enc_txt, scale)]
    loss, offset = _itc_of(x_img[rank * per:(rank + 1) * per], x_txt[rank * per:(rank + 1) * per], *params)
    loss.backward()
    for p in params:  # what data-parallel training does with a replicated parameter's gradient
        dist.all_reduce(p.grad)
        p.grad /= world
    results[rank] = (loss.detach(), offset, [p.grad for p in params])
    dist.destroy_process_group()


def _itc_of(x_img, x_txt, enc_img, enc_txt, scale):
    """A replicated two-tower 'encoder' (one linear map each) followed by the ITC loss."""
    img = torch.nn.functional.normalize(x_img @ enc_img, dim=-1)
    txt = torch.nn.functional.normalize(x_txt @ enc_txt, dim=-1)
    loss, _, offset, _ = itc_loss(img, txt, scale)
    return loss, offset


def test_gathered_itc_over_two_gloo_ranks_equals_one_process():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(8, 12, generator=g), torch.randn(8, 10, generator=g)
    enc_img, enc_txt, scale = torch.randn(12, 16, generator=g), torch.randn(10, 16, generator=g), torch.tensor(2.0)
    ref = [p.clone().requires_grad_(True) for p in (enc_img, enc_txt, scale)]
    ref_loss, _ = _itc_of(x_img, x_txt, *ref)
    ref_loss.backward()
    results = mp.get_context("spawn").Manager().dict()   # never fork this process: it is a Ray driver
    mp.spawn(_itc_rank, args=(2, _free_port(), x_img, x_txt, enc_img, enc_txt, scale, results), nprocs=2, join=True)
    for rank in range(2):
        loss, offset, grads = results[rank]
        assert offset == rank * 4
        assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
        for got, want in zip(grads, ref):
            assert torch.allclose(got, want.grad, atol=1e-5), (got, want.grad)


def test_activation_checkpointing_keeps_weights_and_results():
    from stages.pretrain.train.loop import build_model

    torch.manual_seed(0)
    plain = build_model(CFG, activation_checkpointing=False)
    torch.manual_seed(0)
    wrapped = build_model(CFG, activation_checkpointing=True)
    assert list(plain.state_dict()) == list(wrapped.state_dict()), "an export loads either way"
    b = _batch()
    weights = {"itc": 1, "itm": 0, "mlm": 0, "lm": 1}
    a = pretrain_losses(plain, b, SPECIAL, weights)["loss"]
    c = pretrain_losses(wrapped, b, SPECIAL, weights)["loss"]
    a.backward()
    c.backward()
    assert torch.allclose(a, c)
    assert torch.allclose(plain.blocks[0].attn.qkv.weight.grad, wrapped.blocks[0].attn.qkv.weight.grad, atol=1e-6)
