"""The DALL-E transformer: causality, attention patterns, segment-restricted logits, loss weighting, config.

Tiny real models (dim 32, depth 2, a 4x4 grid, 6 text positions); run with `pytest tests/test_transformer.py`.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from dalle_mini_impl.config import TransformerConfig, config_from_dict, config_to_dict
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.model.transformer import (
    DALLE,
    PRESETS,
    additive_mask,
    pattern_mask,
    preset_config,
    resolve_config,
)

PAD, BOS, EOS = 0, 1, 2
T, TV, IV = 6, 20, 16  # text positions, text vocabulary, image codebook


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> TransformerConfig:
    base = dict(text_vocab=TV, image_vocab=IV, text_len=T, grid_h=4, grid_w=4, pad_id=PAD, dim=32, depth=2, heads=4)
    return resolve_config(TransformerConfig(**{**base, **kw}))


def make(seed=0, **kw) -> DALLE:
    torch.manual_seed(seed)
    return DALLE(tiny(**kw)).eval()


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.full((b, T), PAD)
    text[:, 0] = BOS
    for i in range(b):
        length = 1 + i % (T - 2)  # captions of different lengths, so some rows have pads and some not
        text[i, 1 : 1 + length] = torch.randint(3, TV, (length,), generator=g)
        text[i, 1 + length] = EOS
    image = torch.randint(0, IV, (b, 16), generator=g)
    return text, image


VARIANTS = [
    dict(),
    dict(pos_2d="rope"),
    dict(text_pad="mask"),
    dict(attn_patterns=["row", "column"], pos_2d="rope", text_pad="mask"),
    dict(attn_patterns=["conv", "full"], conv_kernel=3, qk_norm=True, mlp="gelu", norm="rms"),
    dict(image_factors=[2, 8]),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_changing_a_token_leaves_every_earlier_logit_unchanged(kw):
    model = make(**kw)
    text, image = batch()
    with torch.no_grad():
        ref = model(text, image)
        for j in (0, 5, 14):  # image token j sits at position T + j
            changed = image.clone()
            changed[:, j] = (changed[:, j] + 1) % IV
            out = model(text, changed)
            torch.testing.assert_close(out[:, : T + j], ref[:, : T + j], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, T + j :], ref[:, T + j :])
        for i in (1, 3):
            changed = text.clone()
            changed[:, i] = 7
            out = model(changed, image)
            torch.testing.assert_close(out[:, :i], ref[:, :i], rtol=0, atol=1e-5)


def test_logits_are_restricted_to_the_segment_they_predict():
    model = make()
    text, image = batch()
    with torch.no_grad():
        logits = model(text, image)  # (b, T + 15, TV + IV)
    assert logits.shape == (3, T + 15, TV + IV)
    assert torch.isneginf(logits[:, : T - 1, TV:]).all() and torch.isfinite(logits[:, : T - 1, :TV]).all()
    assert torch.isneginf(logits[:, T - 1 :, :TV]).all() and torch.isfinite(logits[:, T - 1 :, TV:]).all()


@pytest.mark.parametrize(
    "pattern,source,unaffected",
    [
        ("row", 0, range(4, 15)),  # image[0] is in row 0: rows 1.. never see it
        ("column", 0, [i for i in range(15) if i % 4]),  # column 0: columns 1..3 never see it
        ("conv", 0, [12, 13, 14]),  # 3x3 window, two layers: reach 2 cells; row 3 is 3 rows away
    ],
)
def test_sparse_patterns_limit_what_image_positions_see(pattern, source, unaffected):
    model = make(attn_patterns=[pattern], conv_kernel=3)
    text, image = batch()
    changed = image.clone()
    changed[:, source] = (changed[:, source] + 1) % IV
    with torch.no_grad():
        ref, out = model(text, image), model(text, changed)
    positions = [T + i for i in unaffected]  # the position holding image token i
    torch.testing.assert_close(out[:, positions], ref[:, positions], rtol=0, atol=1e-5)
    assert not torch.allclose(out[:, T + source], ref[:, T + source])


def test_pattern_masks_are_causal_and_always_show_text():
    cfg = tiny(conv_kernel=3)
    L = cfg.seq_len
    for p in ("full", "row", "column", "conv"):
        m = pattern_mask(cfg, p)
        assert m.shape == (L, L)
        assert not m.triu(1).any(), p  # causal
        assert m[T:, :T].all(), p  # image queries see all text
        assert m.diagonal().all(), p
    row = pattern_mask(cfg, "row")
    assert row[T + 5, T + 4] and not row[T + 5, T + 3]  # cell 5 = (1, 1): sees (1, 0), not (0, 3)


def test_loss_is_the_weighted_sum_of_text_and_image_cross_entropy_without_pads():
    model = make(text_loss_weight=0.25)
    text, image = batch()
    with torch.no_grad():
        loss, parts = model.loss(text, image)
        logits = model(text, image)
    targets = text[:, 1:]
    keep = targets != PAD
    assert (~keep).any()  # the batch has pad targets, so leaving them out matters
    text_ce = F.cross_entropy(logits[:, : T - 1][keep], targets[keep])
    image_ce = F.cross_entropy(logits[:, T - 1 :].flatten(0, 1), (image + TV).flatten())
    torch.testing.assert_close(parts["text_loss"], text_ce)
    torch.testing.assert_close(parts["image_loss"], image_ce)
    torch.testing.assert_close(loss, 0.25 * text_ce + 0.75 * image_ce)


def test_pads_in_loss_counts_every_text_target():
    model = make(pads_in_loss=True)
    text, image = batch()
    with torch.no_grad():
        _, parts = model.loss(text, image)
        logits = model(text, image)
    expected = F.cross_entropy(logits[:, : T - 1].flatten(0, 1), text[:, 1:].flatten())
    torch.testing.assert_close(parts["text_loss"], expected)


@pytest.mark.parametrize("text_pad,pads_matter", [("per_position", True), ("mask", False)])
def test_pads_are_tokens_per_position_and_invisible_when_masked(text_pad, pads_matter):
    model = make(text_pad=text_pad)
    text, image = batch()
    assert (text == PAD).any(dim=1).all()
    with torch.no_grad():
        ref = model(text, image)
        pad_rows = [PAD] if text_pad == "mask" else list(range(TV, TV + T))
        model.text_emb.weight[pad_rows] += torch.randn(len(pad_rows), 32)  # not a constant: LayerNorm
        out = model(text, image)
    # every position whose own token is not a pad
    real = torch.cat([text != PAD, torch.ones(3, 15, dtype=torch.bool)], dim=1)
    assert pads_matter == (not torch.allclose(out[real], ref[real], atol=1e-5))


def test_mask_mode_rejects_pads_in_loss():
    with pytest.raises(UserError, match="pads_in_loss"):
        tiny(text_pad="mask", pads_in_loss=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    """... and keeps fewer activations for the backward pass (once only the gradients were compared, which a flag
    that did nothing passed)."""
    text, image = batch()
    grads, kept = [], []
    for ckpt in (False, True):
        model = make(dropout=0.0).train()
        model.gradient_checkpointing = ckpt
        saved = []
        # what autograd saves for the backward pass outside the checkpointed blocks (inside them their own hooks
        # keep nothing but the inputs)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            loss = model.loss(text, image)[0]
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        kept.append(sum(saved))
    torch.testing.assert_close(grads[0], grads[1])
    assert kept[1] < 0.5 * kept[0], kept


@pytest.mark.parametrize("key", ["dropout", "attn_dropout"])
def test_dropout_acts_in_train_mode_only(key):
    model = make(**{key: 0.5})
    text, image = batch()
    with torch.no_grad():
        assert torch.equal(model(text, image), model(text, image))
        model.train()
        assert not torch.equal(model(text, image), model(text, image))


def test_no_dropout_trains_as_it_evaluates():
    model = make(dropout=0.0, attn_dropout=0.0)
    text, image = batch()
    with torch.no_grad():
        evaluated = model(text, image)
        torch.testing.assert_close(model.train()(text, image), evaluated)


@pytest.mark.parametrize("key, value", [("dropout", 1.0), ("attn_dropout", -0.1)])
def test_dropout_out_of_range_is_refused(key, value):
    with pytest.raises(UserError, match=f"'{key}' is {value}; it must be in \\[0, 1\\)"):
        tiny(**{key: value})


def test_param_groups_split_matmul_weights_from_the_rest():
    model = make(qk_norm=True)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    decayed = {id(p) for p in decay["params"]}
    assert id(model.head.weight) in decayed and id(model.blocks[0].mlp.up.weight) in decayed
    for p in (model.text_emb.weight, model.image_emb.weight, model.text_pos.weight, model.norm.weight):
        assert id(p) not in decayed
    assert all(p.dim() == 2 for p in decay["params"])


def test_parameter_count_and_flops():
    model = make()
    cfg = model.cfg
    per_block = 3 * 32 * 32 + 32 * 32 + 32 * 128 * 2 + 128 * 32 + 4 * 32  # qkv, out, swiglu up, down, 2 norms
    expected = cfg.depth * per_block + 2 * 32 + 32 * (TV + IV)  # final norm, head
    assert model.num_params() == expected
    embeddings = (TV + T) * 32 + IV * 32 + T * 32 + 4 * 32 + 4 * 32
    assert model.num_params(non_embedding=False) == expected + embeddings
    assert model.flops_per_token() == 6 * expected + 12 * 2 * (T + 15) * 32


def test_product_codes_are_embedded_and_predicted_per_factor():
    """image_factors [2, 8] over 16 ids: id 8a + b is the pair (a, b); embedding and logit sum the pair's."""
    model = make(image_factors=[2, 8])
    assert model.image_emb.num_embeddings == 10 and model.head.weight.shape[1] == TV + 10
    image = torch.tensor([[0, 5, 11, 15]])
    rows = torch.tensor([[[0, 2], [0, 7], [1, 5], [1, 9]]])  # (a, 2 + b) for 0, 5 = (0, 5), 11 = (1, 3), 15 = (1, 7)
    with torch.no_grad():
        model.row_pos.weight.zero_()
        model.col_pos.weight.zero_()
    torch.testing.assert_close(model.embed_image(image), model.image_emb(rows).sum(-2))
    h = torch.randn(5, 32)
    per_factor = h @ model.head.weight[:, TV:]  # (5, 2 + 8)
    first, second = per_factor[:, :2], per_factor[:, 2:]
    logits = model.image_logits(h)  # (5, 16)
    torch.testing.assert_close(logits.view(5, 2, 8), first[:, :, None] + second[:, None, :])
    # the flat softmax is the product of the factor softmaxes: the factors are independent given h
    flat = logits.log_softmax(-1).view(5, 2, 8)
    torch.testing.assert_close(flat, first.log_softmax(-1)[:, :, None] + second.log_softmax(-1)[:, None, :])


def test_product_code_loss_is_the_cross_entropy_over_flat_ids():
    model = make(image_factors=[4, 4], text_loss_weight=0.0)
    text, image = batch()
    with torch.no_grad():
        loss, parts = model.loss(text, image)
        logits = model(text, image)
    assert logits.shape[-1] == TV + IV
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, T - 1 :].flatten(0, 1), (image + TV).flatten()))


def test_image_factors_must_multiply_to_the_image_vocabulary():
    with pytest.raises(UserError, match="image_factors"):
        tiny(image_factors=[4, 8])  # 32 ids, not 16
    assert tiny().image_factors == [IV] and tiny(image_factors=[2, 2, 4]).image_rows == 8


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    cfg = tiny(attn_patterns=["row", "conv"], pos_2d="rope")
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))), TransformerConfig)
    assert again == cfg and again.head_dim == 8
    assert resolve_config(again) == cfg  # resolving is idempotent
    with pytest.raises(UserError, match="nope"):
        config_from_dict({**config_to_dict(cfg), "nope": 1}, TransformerConfig)
    with pytest.raises(UserError, match="attn_patterns"):
        tiny(attn_patterns=["diagonal"])


def test_presets_reproduce_the_anchor_geometries():
    a = preset_config("anchor-tiny")
    assert (a.dim, a.depth, a.heads, a.head_dim, a.text_len, a.text_vocab, a.image_vocab, a.image_len) == (
        256, 4, 8, 32, 16, 1000, 512, 64,
    )  # fmt: skip
    m = preset_config("anchor-medium")
    assert (m.dim, m.depth, m.heads, m.head_dim, m.text_len, m.text_vocab, m.image_vocab, m.image_len) == (
        512, 6, 8, 64, 64, 10000, 1024, 64,
    )  # fmt: skip
    d = preset_config("dalle256")
    assert (d.dim, d.depth, d.heads, d.head_dim, d.text_len + d.image_len, d.image_vocab) == (
        1024, 12, 16, 64, 64 + 1024, 8192,
    )  # fmt: skip
    assert {"tiny", "small", "base", "large"} <= set(PRESETS)


def test_resolve_takes_geometry_from_the_tokenizers_and_overrides_from_the_run():
    geometry = dict(text_vocab=64, image_vocab=512, text_len=16, grid_h=8, grid_w=8, pad_id=3)
    run_section = TransformerConfig(preset="anchor-medium")
    cfg = resolve_config(run_section, **geometry)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.head_dim) == (512, 6, 8, 64)
    assert (cfg.text_vocab, cfg.image_vocab, cfg.text_len, cfg.pad_id) == (64, 512, 16, 3)
    assert cfg.image_factors == [512] and run_section.dim == 0  # the run's section is not written
    tcfg = TransformerConfig(preset="anchor-medium", dim=128, depth=2, pos_2d="rope", attn_patterns=["row"])
    cfg = resolve_config(tcfg, **geometry)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.head_dim) == (128, 2, 8, 16)
    assert cfg.pos_2d == "rope" and cfg.attn_patterns == ["row"]
    with pytest.raises(UserError, match="preset"):
        resolve_config(TransformerConfig(preset="huge"), **geometry)
    # a geometry value the run sets must be the tokenizers'; the same value is fine
    with pytest.raises(UserError, match="'transformer.text_vocab' is 100 but the tokenizers give 64"):
        resolve_config(TransformerConfig(text_vocab=100), **geometry)
    assert resolve_config(TransformerConfig(text_vocab=64), **geometry).text_vocab == 64


def test_a_model_needs_its_geometry():
    with pytest.raises(UserError, match="'text_vocab' is 0; it must be a positive integer"):
        DALLE(TransformerConfig())  # the run section alone: nothing says how many ids there are


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_additive_mask_attends_as_its_boolean_mask_does_bit_for_bit(dtype):
    # a cached pass converts each mask once for all layers: SDPA must read it as it reads the boolean mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 8, generator=g).to(dtype) for s in (5, 12, 12))
    visible = torch.ones(16, 16, dtype=torch.bool).tril()[7:12, :12]  # a window of 5 queries over 12 keys
    additive = additive_mask(visible, dtype)
    assert (
        additive.dtype == dtype and torch.equal(additive == 0, visible) and additive[~visible].eq(float("-inf")).all()
    )
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=additive), expected)
