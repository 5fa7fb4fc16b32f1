"""The per-token diffusion head: schedule, loss, sampling, per-step log-probs."""

import math

import torch

from structmar.diffusion import DiffLoss, Schedule, gaussian_log_prob, spaced_timesteps, step_log_prob


def randomised_head(steps=10, channels=6, z_dim=12, seed=0):
    torch.manual_seed(seed)
    head = DiffLoss(channels, z_dim, depth=2, width=32, num_sampling_steps=steps)
    for p in head.parameters():  # leave the zero init so outputs depend on every weight
        torch.nn.init.normal_(p, std=0.1)
    return head


def test_cosine_schedule_and_respacing():
    full = Schedule.cosine()
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert full.num_steps == 1000
    assert abs(full.alphas_cumprod[499].item() - abar(0.5) / abar(0.0)) < 1e-9
    assert full.betas.max().item() <= 0.999
    kept = spaced_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    spaced = Schedule.cosine(100)
    assert spaced.timesteps.tolist() == kept
    # respacing keeps alpha_bar at the kept steps
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timesteps], rtol=1e-10)


def test_shifted_schedule_divides_the_snr_everywhere():
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    shifted = lambda t: abar(t) / (abar(t) + 16 * (1 - abar(t)))
    plain, full = Schedule.cosine(), Schedule.cosine(shift=4.0)
    assert abs(full.alphas_cumprod[499].item() - shifted(0.5) / shifted(0.0)) < 1e-9
    snr = lambda a: a / (1 - a)
    ratio = snr(full.alphas_cumprod[10:980]) / snr(plain.alphas_cumprod[10:980])
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / 16), rtol=5e-3)  # up to each schedule's abar(0)
    spaced = Schedule.cosine(25, shift=4.0)
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timesteps], rtol=1e-10)
    # the head trains and samples on its shifted schedule, also when GRPO respaces its rollouts
    from structmar.grpo import rollout_schedule

    head = DiffLoss(6, 12, depth=2, width=32, num_sampling_steps=25, noise_shift=4.0)
    assert torch.equal(head.train_schedule.alphas_cumprod, full.alphas_cumprod)
    assert torch.equal(head.sample_schedule.alphas_cumprod, spaced.alphas_cumprod)
    with rollout_schedule(head, 10):
        assert torch.equal(head.sample_schedule.alphas_cumprod, Schedule.cosine(10, shift=4.0).alphas_cumprod)


def test_loss_is_finite_and_trains_every_part():
    head = randomised_head()
    target, z = torch.randn(64, 6) * 0.5, torch.randn(64, 12, requires_grad=True)
    mask = (torch.arange(64) % 2).float()
    loss = head(target, z, mask)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert z.grad[mask.bool()].abs().sum() > 0 and z.grad[~mask.bool()].abs().sum() == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_fresh_head_predicts_zero_noise():
    head = DiffLoss(6, 12, depth=2, width=32, num_sampling_steps=10)
    out = head.net(torch.randn(5, 6), torch.arange(5), torch.randn(5, 12))
    assert out.shape == (5, 12) and out.eq(0).all()


def test_sampling_is_seeded_and_trace_is_consistent():
    head = randomised_head()
    z, z_u = torch.randn(2, 7, 12)
    run = lambda seed, **kw: head.sample(z, 0.8, 3.0, z_u, generator=torch.Generator().manual_seed(seed), **kw)
    x, trace = run(0, record=True)
    assert torch.equal(x, run(0)[0]) and not torch.equal(x, run(1)[0])
    S = head.sample_schedule.num_steps
    assert trace.x_t.shape == (S, 7, 6) and trace.t_index.tolist() == list(range(S - 1, -1, -1))
    assert trace.timestep[0] == 999 and trace.timestep[-1] == 0
    assert torch.equal(trace.x_prev[-1], x) and torch.equal(trace.x_t[1:], trace.x_prev[:-1])
    assert trace.std[-1].eq(0).all() and (trace.std[:-1] > 0).all()
    # GRPO's recomputation: same mean, and the log-prob of a Gaussian step
    s = 3
    mean, logp = step_log_prob(head, z, trace.x_t[s], trace.t_index[s], trace.x_prev[s], trace.std[s], 3.0, z_u)
    assert torch.allclose(mean, trace.mean[s], atol=1e-6)
    noise = (trace.x_prev[s] - mean) / trace.std[s]
    expected = (-0.5 * noise**2 - trace.std[s].log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert logp.shape == (7,) and torch.allclose(logp, expected, atol=1e-4)


def test_guidance_mixes_noise_only():
    head = randomised_head()
    z, z_u, x_t = torch.randn(3, 4, 12)[0], torch.randn(4, 12), torch.randn(4, 6)
    t = torch.full((4,), 5)
    mean_1, std_1 = head.step_mean(z, x_t, t, 1.0, z_u)
    mean_c, std_c = head.step_mean(z, x_t, t)
    assert torch.equal(mean_1, mean_c)
    mean_g, std_g = head.step_mean(z, x_t, t, 4.0, z_u)
    assert not torch.allclose(mean_g, mean_c) and torch.allclose(std_g, std_c)  # variance from the conditional


def test_gaussian_log_prob_matches_torch():
    x, m, s = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 3) + 0.1
    ref = torch.distributions.Normal(m, s).log_prob(x).sum(-1)
    assert torch.allclose(gaussian_log_prob(x, m, s), ref, atol=1e-5)


def test_sampling_clamps_denoised_tokens_to_the_data_range():
    from structmar.config import model_config
    from structmar.model import StructMAR

    torch.manual_seed(0)
    head = DiffLoss(token_channels=8, z_channels=16, depth=2, width=32, num_sampling_steps=25)
    for p in head.net.parameters():  # an untrained head: its noise prediction is off at t = T
        torch.nn.init.normal_(p, std=0.3)
    z, x_t = torch.randn(64, 16), torch.randn(64, 8)
    first = head.sample_schedule.num_steps - 1
    raw, _ = head.step_mean(z, x_t, first)
    head.clip_denoised = 1.0
    clamped, _ = head.step_mean(z, x_t, first)
    s = head.sample_schedule
    c1, c2 = (float(s.posterior_mean_coef1[first]), float(s.posterior_mean_coef2[first]))
    assert raw.abs().max() > 20  # the cosine schedule's first step amplifies the error ~1e3x
    assert clamped.abs().max() <= c1 + c2 * x_t.abs().max() + 1e-5
    assert StructMAR(model_config("tiny")).diffloss.clip_denoised == 1.0  # pixel tokens lie in [-1, 1]
    kl16 = model_config("tiny", tokenizer="kl16", image_size=64)
    assert kl16.data_range is None  # kl16 latents are sampled unclipped, as MAR does
    assert StructMAR(model_config("tiny", clip_denoised=False)).diffloss.clip_denoised is None
