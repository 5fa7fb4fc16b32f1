"""The iterative masked sampler: schedule, determinism, CFG, recorded trajectories, decoding."""

import math

import pytest
import torch
import torch.nn as nn

from structmar.config import model_config
from structmar.diffusion import step_log_prob
from structmar.model import StructMAR, patchify
from structmar.sample import cfg_scale_at, generate_images, sample_latents
from structmar.tokenizer import build_tokenizer


def make_model(**overrides):
    torch.manual_seed(0)
    model = StructMAR(model_config("tiny", num_sampling_steps=5, **overrides)).eval()
    for p in model.diffloss.net.final_layer.parameters():  # a zero-init head would ignore its condition
        nn.init.normal_(p, std=0.05)
    for block in model.encoder_blocks:
        nn.init.constant_(block.cross_gate, 0.5)  # let the text matter
    return model


def conditions(cfg, B=2, K=3, Lt=5):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(B, K, 2, generator=g) * 0.5
    return dict(text_tokens=torch.randn(B, Lt, cfg.text_dim, generator=g),
                text_mask=torch.ones(B, Lt, dtype=torch.bool),
                text_pooled=torch.randn(B, cfg.text_dim, generator=g), boxes=torch.cat([x0, x0 + 0.4], -1),
                box_mask=torch.ones(B, K, dtype=torch.bool), tag_embeds=torch.randn(B, K, cfg.text_dim, generator=g))


def test_seeded_sampling_is_deterministic():
    model = make_model()
    batch = conditions(model.cfg)
    run = lambda seed, **kw: sample_latents(model, batch, num_iter=4, guidance=2.0, temperature=0.9,
                                            generator=torch.Generator().manual_seed(seed), **kw).latents
    a = run(0)
    assert a.shape == (2, model.cfg.token_channels, model.cfg.grid_size, model.cfg.grid_size)
    assert torch.equal(a, run(0)) and not torch.equal(a, run(1))
    assert not torch.equal(a, run(0, cfg_schedule="constant"))
    with pytest.raises(ValueError, match="unknown cfg schedule 'cosine'"):
        run(0, cfg_schedule="cosine")
    # given orders are followed: each step generates the tail of the still-masked prefix of its row's order
    orders = torch.stack([torch.randperm(model.cfg.seq_len) for _ in range(2)])
    fixed = sample_latents(model, batch, num_iter=4, orders=orders, record=True,
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(fixed.orders, orders)
    assert all(set(orders[0, int(st.mask[0].sum()) - int((st.batch_index == 0).sum()):int(st.mask[0].sum())].tolist())
               == set(st.token_index[st.batch_index == 0].tolist()) for st in fixed.steps)
    with pytest.raises(ValueError, match="orders of shape"):
        run(0, orders=orders[:1])


def test_cosine_mask_schedule_and_trajectory():
    model = make_model()
    cfg, L = model.cfg, model.cfg.seq_len
    num_iter = 6
    out = sample_latents(model, conditions(cfg), num_iter=num_iter, guidance=3.0,
                         generator=torch.Generator().manual_seed(0), record=True)
    assert len(out.steps) == num_iter
    remaining = L
    seen = torch.zeros(2, L, dtype=torch.int64)
    for k, step in enumerate(out.steps):
        assert int(step.mask[0].sum()) == remaining
        after = max(1, min(remaining - 1, math.floor(L * math.cos(math.pi / 2 * (k + 1) / num_iter))))
        generated = remaining if k == num_iter - 1 else remaining - after
        assert step.token_index.numel() == 2 * generated and generated >= 1
        assert step.cfg_scale == pytest.approx(cfg_scale_at(3.0, "linear", after, L))
        seen[step.batch_index, step.token_index] += 1
        # the masked set is always a prefix of each image's order: a step generates the prefix's tail
        assert torch.equal(step.token_index[step.batch_index == 0].sort().values,
                           out.orders[0, remaining - generated:remaining].sort().values)
        remaining -= generated
        assert step.trace.x_t.shape == (model.cfg.num_sampling_steps, 2 * generated, cfg.token_channels)
    assert seen.eq(1).all()  # every token generated exactly once
    final = patchify(out.latents)
    last = out.steps[-1]
    assert torch.equal(final[last.batch_index, last.token_index], last.trace.x_prev[-1])


def test_recorded_steps_reproduce_log_probs():
    """GRPO's recomputation: z from the recorded mask and the final tokens, then the step's Gaussian."""
    model = make_model()
    batch = conditions(model.cfg)
    out = sample_latents(model, batch, num_iter=3, guidance=2.5, temperature=0.7,
                         generator=torch.Generator().manual_seed(0), record=True)
    step = out.steps[1]
    tokens = patchify(out.latents) * (~step.mask).unsqueeze(-1)  # what was known when the step ran
    drop = torch.tensor([False, False, True, True])
    cond = model.condition({k: torch.cat([v, v]) for k, v in batch.items()}, drop)
    with torch.no_grad():
        z = model.predict(torch.cat([tokens, tokens]), torch.cat([step.mask, step.mask]), cond)
    z_c = z[:2][step.batch_index, step.token_index]
    z_u = z[2:][step.batch_index, step.token_index]
    s = 2
    tr = step.trace
    with torch.no_grad():
        mean, logp = step_log_prob(model.diffloss, z_c, tr.x_t[s], tr.t_index[s], tr.x_prev[s], tr.std[s],
                                   step.cfg_scale, z_u)
    assert torch.allclose(mean, tr.mean[s], atol=1e-5)
    assert torch.isfinite(logp).all() and logp.shape == (step.token_index.numel(),)


def test_unconditional_branch_is_the_null_condition():
    model = make_model()
    batch = conditions(model.cfg)
    cond = model.condition(batch, drop=torch.ones(2, dtype=torch.bool))
    assert torch.equal(cond.buffer, model.fake_latent.expand(2, model.cfg.buffer_size, -1))
    # with cfg = 1 the condition matters: another caption gives other tokens for the same seed
    run = lambda b: sample_latents(model, b, num_iter=2, generator=torch.Generator().manual_seed(0)).latents
    other = dict(batch, text_pooled=torch.randn_like(batch["text_pooled"]))
    assert not torch.equal(run(batch), run(other))


def test_generate_images_decodes_with_the_pixel_tokenizer():
    model = make_model()
    tokenizer = build_tokenizer("pixel", pixel_patch=model.cfg.pixel_patch)
    images, out = generate_images(model, tokenizer, conditions(model.cfg), num_iter=2,
                                  generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, model.cfg.image_size, model.cfg.image_size)
    assert torch.allclose(tokenizer.decode(out.latents), images)
