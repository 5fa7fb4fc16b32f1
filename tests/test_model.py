"""StructMAR: shapes, gradients, MAR equivalence with the structure off, official weights, bad input."""

import argparse
import json
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import Block as TimmBlock

from structmar.config import model_config
from structmar.diffusion import DiffLoss
from structmar.model import (
    StructMAR,
    is_addition,
    load_weights,
    mask_by_order,
    parameter_counts,
    patchify,
    read_weights,
    sample_mask_ratio,
    sample_orders,
)

OFF = dict(rope=False, layout=False, text=False)


def make_batch(cfg, B=3, K=5, Lt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, K, 2, generator=g) * 0.6
    wh = torch.rand(B, K, 2, generator=g) * 0.4
    n_boxes = torch.tensor([[K], [2], [0]])[:B]
    return dict(
        latents=torch.randn(B, cfg.token_channels, cfg.grid_size, cfg.grid_size, generator=g),
        text_tokens=torch.randn(B, Lt, cfg.text_dim, generator=g),
        text_mask=torch.arange(Lt).expand(B, Lt) < torch.tensor([[Lt], [3], [1]])[:B],
        text_pooled=torch.randn(B, cfg.text_dim, generator=g),
        boxes=torch.cat([x0, x0 + wh], -1) * (torch.arange(K).expand(B, K) < n_boxes).unsqueeze(-1),
        box_mask=torch.arange(K).expand(B, K) < n_boxes,
        tag_embeds=torch.randn(B, K, cfg.text_dim, generator=g),
        category_ids=torch.zeros(B, K, dtype=torch.long),
        image_ids=torch.arange(B),
    )


class RefMAR(nn.Module):
    """MAR's backbone as MAR builds it (timm Blocks, MAR's parameter names), for equivalence tests."""

    def __init__(self, cfg, class_num=10):
        super().__init__()
        W, S, L = cfg.width, cfg.buffer_size, cfg.seq_len
        self.cfg = cfg
        block = partial(TimmBlock, W, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6), proj_drop=cfg.proj_dropout,
                        attn_drop=cfg.attn_dropout)
        self.class_emb = nn.Embedding(class_num, W)
        self.fake_latent = nn.Parameter(torch.zeros(1, W))
        self.z_proj = nn.Linear(cfg.token_channels, W)
        self.z_proj_ln = nn.LayerNorm(W, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S + L, W))
        self.encoder_blocks = nn.ModuleList([block() for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(W, eps=1e-6)
        self.decoder_embed = nn.Linear(W, W)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S + L, W))
        self.decoder_blocks = nn.ModuleList([block() for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(W, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, W))
        self.diffloss = DiffLoss(cfg.token_channels, W, cfg.diffusion_depth, cfg.diffusion_width,
                                 cfg.num_sampling_steps)
        for p in self.parameters():  # random everything, so a mis-mapped tensor cannot hide behind an init
            nn.init.normal_(p, std=0.05)

    def forward(self, latents):
        """MAR's training forward with the class label dropped (the buffer holds fake_latent), same draws."""
        cfg, S = self.cfg, self.cfg.buffer_size
        x = patchify(latents)
        gt = x.clone()
        B, L, _ = x.shape
        orders = sample_orders(B, L)
        mask = torch.zeros(B, L).scatter(1, orders[:, :int(math.ceil(L * sample_mask_ratio(cfg.mask_ratio_min)))], 1.0)
        # encoder
        x = self.z_proj(x)
        W = x.shape[-1]
        x = torch.cat([torch.zeros(B, S, W), x], dim=1)
        mask_wb = torch.cat([torch.zeros(B, S), mask], dim=1)
        class_embedding = self.fake_latent.expand(B, -1)
        if self.training:  # MAR draws the label drop in training only
            drop = (torch.rand(B) < cfg.label_drop_prob).unsqueeze(-1).float()
            class_embedding = drop * self.fake_latent + (1 - drop) * class_embedding
        x[:, :S] = class_embedding.unsqueeze(1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[(1 - mask_wb).nonzero(as_tuple=True)].reshape(B, -1, W)
        for blk in self.encoder_blocks:
            x = blk(x)
        x = self.encoder_norm(x)
        # decoder
        x = self.decoder_embed(x)
        padded = self.mask_token.repeat(B, S + L, 1).clone()
        padded[(1 - mask_wb).nonzero(as_tuple=True)] = x.reshape(-1, W)
        x = padded + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        z = self.decoder_norm(x)[:, S:] + self.diffusion_pos_embed_learned
        mul = cfg.diffusion_batch_mul
        loss = self.diffloss(target=gt.reshape(B * L, -1).repeat(mul, 1), z=z.reshape(B * L, -1).repeat(mul, 1),
                             mask=mask.reshape(B * L).repeat(mul))
        return loss, z


def mar_checkpoint(cfg, path, ema_offset=0.0):
    ref = RefMAR(cfg)
    model_sd = ref.state_dict()
    ema_sd = {k: v + ema_offset for k, v in model_sd.items()}
    args = argparse.Namespace(model=cfg.preset, diffloss_d=cfg.diffusion_depth, diffloss_w=cfg.diffusion_width,
                              img_size=cfg.image_size, buffer_size=cfg.buffer_size, num_sampling_steps="100")
    torch.save({"model": model_sd, "model_ema": ema_sd, "epoch": 3, "args": args, "optimizer": {}}, path)
    return ref


def test_forward_shapes_and_gradients():
    cfg = model_config("tiny")
    model = StructMAR(cfg).train()
    for p in model.diffloss.net.final_layer.parameters():  # the zero-init head would pass no gradient back
        nn.init.normal_(p, std=0.02)
    loss, metrics = model(make_batch(cfg))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(metrics) == {"loss", "mask_ratio"} and 0.7 <= metrics["mask_ratio"] <= 1.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("encoder_blocks.0.cross_gate", "decoder_blocks.1.attn.bias_lambda", "layout_embed.box_mlp.0.weight",
                 "layout_embed.tag_mlp.0.weight", "text_proj.weight", "z_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    cond = model.condition(make_batch(cfg))
    assert cond.buffer.shape == (3, cfg.buffer_size, cfg.width)
    z = model.predict(patchify(make_batch(cfg)["latents"]), mask_by_order(40, sample_orders(3, cfg.seq_len)), cond)
    assert z.shape == (3, cfg.seq_len, cfg.width)


def test_grad_checkpointing_gives_same_loss_and_grads():
    cfg = model_config("tiny", attn_dropout=0.0, proj_dropout=0.0)
    plain = StructMAR(cfg)
    ckpt = StructMAR(model_config("tiny", attn_dropout=0.0, proj_dropout=0.0, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = make_batch(cfg)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        loss, _ = model(batch)
        loss.backward()
        results.append((loss, model.z_proj.weight.grad))
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_structure_off_is_numerically_mar(tmp_path):
    cfg = model_config("tiny", **OFF)  # MAR's dropouts stay on: the draws must line up too
    ref = mar_checkpoint(cfg, tmp_path / "checkpoint-last.pth")
    model = StructMAR(cfg)
    report = load_weights(model, read_weights(str(tmp_path / "checkpoint-last.pth")).model)
    assert report.missing == [] and report.unexpected == ["class_emb.weight"]
    latents = make_batch(cfg)["latents"]
    for train in (True, False):
        ref.train(train)
        model.train(train)
        torch.manual_seed(11)
        ref_loss, _ = ref(latents)
        torch.manual_seed(11)
        loss, _ = model({"latents": latents})
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6), (train, loss, ref_loss)


def test_fresh_structmar_equals_its_mar_init():
    # the text cross-attention is gated by tanh(0): turning text on changes nothing at init
    with_text = StructMAR(model_config("tiny", layout=False)).eval()
    without = StructMAR(model_config("tiny", layout=False, text=False)).eval()
    report = load_weights(without, with_text.state_dict())
    assert report.missing == [] and all(is_addition(n) for n in report.unexpected)
    batch = make_batch(with_text.cfg)
    batch["text_pooled"] = torch.zeros_like(batch["text_pooled"])
    mask = mask_by_order(50, sample_orders(3, with_text.cfg.seq_len))
    tokens = patchify(batch["latents"])
    cond_text = with_text.condition(batch, drop=torch.ones(3, dtype=torch.bool))
    cond_plain = without.condition(batch, drop=torch.ones(3, dtype=torch.bool))
    assert torch.equal(with_text.predict(tokens, mask, cond_text), without.predict(tokens, mask, cond_plain))


def test_official_weights_round_trip(tmp_path):
    cfg = model_config("tiny")
    mar_cfg = model_config("tiny", **OFF)
    ref = mar_checkpoint(mar_cfg, tmp_path / "checkpoint-last.pth", ema_offset=1.0)
    weights = read_weights(str(tmp_path / "checkpoint-last.pth"))
    assert weights.config.preset == "tiny" and not weights.config.rope and weights.config.num_sampling_steps == 100
    model = StructMAR(cfg)
    additions = sorted(n for n, _ in model.named_parameters() if is_addition(n))
    report = load_weights(model, weights.select(ema=True))
    assert report.missing == additions and report.unexpected == ["class_emb.weight"]
    assert {n.split(".")[0] for n in additions} >= {"text_proj", "null_text", "layout_embed", "encoder_blocks"}
    assert torch.equal(model.encoder_blocks[1].attn.qkv.weight, ref.encoder_blocks[1].attn.qkv.weight + 1.0)
    assert torch.equal(model.fake_latent, ref.fake_latent + 1.0)
    assert torch.equal(model.diffloss.net.res_blocks[0].adaLN_modulation[1].bias,
                       ref.diffloss.net.res_blocks[0].adaLN_modulation[1].bias + 1.0)
    # the hub's flat .safetensors
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "mar_tiny.safetensors"))
    flat = read_weights(str(tmp_path / "mar_tiny.safetensors"))
    assert flat.ema is None and flat.config is None
    report = load_weights(StructMAR(cfg), flat.model)
    assert report.missing == additions and report.unexpected == ["class_emb.weight"]
    # structmar's own export: model./model_ema. prefixes and the config in the metadata
    export = {f"model.{k}": v for k, v in model.state_dict().items()}
    export.update({f"model_ema.{k}": v.clone() for k, v in model.state_dict().items()})
    save_file(export, str(tmp_path / "checkpoint-last.safetensors"), metadata={"config": json.dumps(cfg.to_dict())})
    back = read_weights(str(tmp_path / "checkpoint-last.safetensors"))
    assert back.config == cfg and set(back.ema) == set(model.state_dict())
    assert load_weights(StructMAR(back.config), back.model) == type(report)([], [])
    # a wrong head size is an error naming the tensor
    with pytest.raises(ValueError, match="diffloss.net"):
        load_weights(StructMAR(model_config("tiny", diffusion_width=64)), weights.model)


def test_label_drop_swaps_text_and_layout_for_null():
    cfg = model_config("tiny")
    model = StructMAR(cfg)
    batch = make_batch(cfg)
    cond = model.condition(batch, drop=torch.tensor([True, False, False]))
    assert torch.equal(cond.buffer[0], model.fake_latent.expand(cfg.buffer_size, -1))
    assert not torch.equal(cond.buffer[1, :3], model.fake_latent.expand(3, -1))
    assert cond.text_mask[0].tolist() == [True] + [False] * 7  # only the null text token
    assert cond.table.kind[0, :cfg.buffer_size].eq(3).all()  # every slot NULL, so no layout bias either
    assert cond.table.kind[1, :4].tolist() == [1, 2, 2, 3]  # text, two boxes, null
    # in training, label_drop_prob=1 drops every sample, per sample draws otherwise
    model.train()
    always = StructMAR(model_config("tiny", label_drop_prob=1.0)).train()
    always.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    loss_always, _ = always(batch)
    torch.manual_seed(0)
    uncond = {"latents": batch["latents"], "text_tokens": batch["text_tokens"], "text_pooled": batch["text_pooled"],
              "text_mask": torch.zeros_like(batch["text_mask"]), "boxes": batch["boxes"][:, :0],
              "box_mask": batch["box_mask"][:, :0], "tag_embeds": batch["tag_embeds"][:, :0]}
    model.cfg.label_drop_prob = 0.0  # same draws, but the null condition given explicitly
    model.text_proj.weight.data.zero_()
    model.text_proj.bias.data.copy_(model.fake_latent.data[0])
    loss_uncond, _ = model(uncond)
    assert torch.allclose(loss_always, loss_uncond, atol=1e-6)


def test_encoder_uses_true_positions_of_kept_tokens():
    cfg = model_config("tiny")
    model = StructMAR(cfg)
    batch = make_batch(cfg)
    mask = mask_by_order(45, sample_orders(3, cfg.seq_len))
    cond = model.condition(batch)
    _, kept = model.forward_encoder(patchify(batch["latents"]), mask, cond)
    table = cond.table.gather(kept)
    S = cfg.buffer_size
    image = table.kind == 0
    assert torch.equal(table.cell[image], (kept - S)[image])
    assert torch.equal(table.row[image] * cfg.grid_size + table.col[image], (kept - S)[image])
    ctx = model.attention_context(table, cond)
    assert torch.equal(ctx.sin[image], model.rope_sin[(kept - S)[image]])
    assert ctx.sin[~image].eq(0).all() and ctx.cos[~image].eq(1).all()  # buffer unrotated


def test_flex_backend_matches_sdpa_in_the_model():
    cfg = model_config("tiny", attention="sdpa", layout_bias="hard")
    sdpa = StructMAR(cfg).eval()
    flex = StructMAR(model_config("tiny", attention="flex", layout_bias="hard")).eval()
    flex.load_state_dict(sdpa.state_dict())
    batch = make_batch(cfg)
    mask = mask_by_order(51, sample_orders(3, cfg.seq_len))
    with torch.no_grad():  # flex has no backward on CPU
        z_ref = sdpa.predict(patchify(batch["latents"]), mask, sdpa.condition(batch))
        z = flex.predict(patchify(batch["latents"]), mask, flex.condition(batch))
    assert (z - z_ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no attention dropout"):
        StructMAR(model_config("tiny", attention="flex")).train()(batch)


def test_bad_boxes_are_clear_errors():
    cfg = model_config("tiny", max_objects=3)
    model = StructMAR(cfg)
    batch = make_batch(cfg, K=3)
    outside = dict(batch, boxes=batch["boxes"].clone())
    outside["boxes"][0, 1] = torch.tensor([0.2, 0.2, 1.3, 0.5])
    with pytest.raises(ValueError, match="box 1 of sample 0"):
        model(outside)
    inverted = dict(batch, boxes=batch["boxes"].clone())
    inverted["boxes"][1, 0] = torch.tensor([0.6, 0.2, 0.4, 0.5])
    with pytest.raises(ValueError, match="box 0 of sample 1"):
        model(inverted)
    many = make_batch(cfg, K=5)
    with pytest.raises(ValueError, match="sample 0 has 5 boxes, more than max_objects=3"):
        model(many)
    truncating = StructMAR(model_config("tiny", max_objects=3, truncate_boxes=True))
    cond = truncating.condition(many)
    area = (many["boxes"][0, :, 2] - many["boxes"][0, :, 0]) * (many["boxes"][0, :, 3] - many["boxes"][0, :, 1])
    largest = area.argsort(descending=True)[:3]
    expected = truncating.layout_embed(many["boxes"][0, largest][None], many["tag_embeds"][0, largest][None])[0]
    assert torch.allclose(cond.buffer[0, 1:4], expected, atol=1e-6)


def test_mask_ratio_is_the_truncated_normal():
    torch.manual_seed(0)
    draws = torch.cat([sample_mask_ratio(0.7) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 - 0.25 * (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2))
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expected = 1 - 0.25 * (phi(0) - phi(-1.2)) / (Phi(0) - Phi(-1.2))
    assert abs(draws.mean().item() - expected) < 0.005


@pytest.mark.parametrize("preset,published", [("mar_base", 208e6), ("mar_large", 479e6), ("mar_huge", 943e6)])
def test_preset_parameter_counts(preset, published):
    backbone, additions = parameter_counts(model_config(preset))
    assert abs(backbone - published) / published < 0.005, backbone
    assert additions > 0
    assert parameter_counts(model_config(preset, **OFF))[1] == 0


def test_paper_head_flags_override_the_preset():
    b_default, _ = parameter_counts(model_config("tiny"))
    b_big, _ = parameter_counts(model_config("tiny", diffusion_depth=3, diffusion_width=256))
    assert b_big > b_default
    with pytest.raises(ValueError, match="known presets: tiny, small, mar_base"):
        model_config("mar_giant")
