"""Per-token diffusion head: noise schedule, training loss, sampling step and per-step Gaussian log-probs.

The head denoises one token latent x (C channels) conditioned on the backbone's output z for that token.
It is an MLP of AdaLN residual blocks that predicts the noise and a learned variance (2C outputs), trained
with the simple noise MSE plus the variational bound for the variance, on a 1000-step cosine schedule;
sampling uses the same schedule respaced to `num_sampling_steps`, temperature multiplies the sampling
noise, and classifier-free guidance mixes the noise prediction only (the variance comes from the
conditional branch). Parameter names follow MAR's checkpoint layout (`net.time_embed`, `net.res_blocks.N`,
...), so official head weights load one to one.

The schedule is hand-written rather than taken from a library: it is small, and GRPO needs the exact
per-step Gaussian (mean, sigma) of each token's reverse transition and its log-density
(`step_mean`, `gaussian_log_prob`), which no kept diffusion library exposes for a per-token MLP head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

TRAIN_STEPS = 1000

# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def cosine_betas(num_steps: int = TRAIN_STEPS, max_beta: float = 0.999, shift: float = 1.0) -> torch.Tensor:
    """Betas of the cosine schedule (alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)), float64.

    `shift` s > 1 divides the signal-to-noise ratio at every t by s^2 (alpha_bar -> abar / (abar + s^2 (1 - abar)),
    the resolution shift of "simple diffusion"): for tokens whose channels repeat one value (a flat pixel patch
    of p x p pixels: s ~ p), noisy tokens still reveal that value, and only the shifted schedule leaves enough of
    the chain where the head must take it from the backbone's condition. s = 1 is MAR's schedule."""

    def alpha_bar(t: float) -> float:
        a = math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return a / (a + shift**2 * (1.0 - a))

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def spaced_timesteps(num_steps: int, num_kept: int) -> list[int]:
    """`num_kept` evenly strided timesteps of `num_steps` (first and last included), ascending."""
    if not 1 <= num_kept <= num_steps:
        raise ValueError(f"num_sampling_steps {num_kept} must lie in [1, {num_steps}]")
    stride = 1.0 if num_kept <= 1 else (num_steps - 1) / (num_kept - 1)
    steps, position = [], 0.0
    for _ in range(num_kept):  # accumulate like the reference spacing so rounding ties land identically
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


@dataclass
class Schedule:
    """A discrete Gaussian diffusion process; index i runs 0..T-1, `timesteps[i]` is the 1000-step time it denotes."""

    betas: torch.Tensor  # (T,) float64
    timesteps: torch.Tensor  # (T,) long: the original timestep each index stands for (fed to the head)

    def __post_init__(self):  # schedules live on the CPU in float64 (even while a model is built on "meta")
        b = self.betas
        self.alphas_cumprod = torch.cumprod(1.0 - b, 0)
        prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        posterior_variance = b * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at index 0: clip its log to the next value
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - b).sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(b)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @classmethod
    def cosine(cls, num_sampling_steps: int | None = None, shift: float = 1.0) -> Schedule:
        """The 1000-step cosine schedule (SNR / shift^2), or its respacing to `num_sampling_steps` kept steps."""
        betas = cosine_betas(TRAIN_STEPS, shift=shift)
        if num_sampling_steps is None or num_sampling_steps == TRAIN_STEPS:
            return cls(betas, torch.arange(TRAIN_STEPS, device="cpu"))
        kept = spaced_timesteps(TRAIN_STEPS, num_sampling_steps)
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        new_betas, last = [], 1.0
        for t in kept:  # keep alpha_bar at the kept steps: beta'_i = 1 - abar(t_i) / abar(t_{i-1})
            new_betas.append(1.0 - alphas_cumprod[t].item() / last)
            last = alphas_cumprod[t].item()
        return cls(torch.tensor(new_betas, dtype=torch.float64, device="cpu"), torch.tensor(kept, device="cpu"))

    def at(self, values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[index] as a (N, 1) float32 column on `like`'s device."""
        return values.to(like.device)[index].float().unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# Gaussian helpers (shared by training, sampling and GRPO)
# ---------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of x under a Gaussian discretised to 8-bit bins on [-1, 1] (the bound's t = 0 term)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) summed over the last (channel) dim: (..., C) -> (...)."""
    std = std.expand_as(mean)
    return (-((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def split_output(schedule: Schedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Head output (N, 2C) at index t -> (eps, log_variance); the variance interpolates in log space
    between the clipped posterior variance (-1) and beta_t (+1)."""
    eps, var_values = out.chunk(2, dim=-1)
    min_log = schedule.at(schedule.posterior_log_variance, t, x_t)
    max_log = schedule.at(schedule.log_betas, t, x_t)
    frac = (var_values + 1) / 2
    return eps, frac * max_log + (1 - frac) * min_log


def posterior_mean_from_eps(schedule: Schedule, x_t, t, eps, clip: float | None = None):
    """Mean of p(x_{t-1} | x_t) from a noise prediction, through the implied x_0 (clamped to [-clip, clip]
    when the data range is known)."""
    x0 = schedule.at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - schedule.at(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t
    ) * eps
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    mean = (schedule.at(schedule.posterior_mean_coef1, t, x_t) * x0
            + schedule.at(schedule.posterior_mean_coef2, t, x_t) * x_t)
    return mean, x0


# ---------------------------------------------------------------------------------------------
# The head network (MAR's SimpleMLPAdaLN layout)
# ---------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim); dim is even here

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(modulated LayerNorm(x)), modulation from the condition y."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """(x_t (N, C), t (N,), z (N, Z)) -> (N, 2C): predicted noise and variance interpolation values."""

    def __init__(self, in_channels: int, width: int, z_channels: int, depth: int, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            # zero modulation: each residual block starts as the identity (AdaLN-Zero)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # zero output: the head starts predicting zero noise and mid-range variance
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, z):
        dtype = self.input_proj.weight.dtype  # the schedule math runs in fp32; the network in its own dtype
        x = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(z.to(dtype))
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


# ---------------------------------------------------------------------------------------------
# The head: loss and sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class DenoisingTrace:
    """One token batch's reverse chain, step by step (index s = 0 is the first, noisiest step).

    x_t, x_prev, mean: (S, N, C); std: (S, N, C) the sigma actually used (learned std x temperature, 0 at the
    last step, which adds no noise); t_index: (S,) respaced index; timestep: (S,) 1000-step timestep.
    """

    x_t: torch.Tensor
    x_prev: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    t_index: torch.Tensor
    timestep: torch.Tensor


class DiffLoss(nn.Module):
    """The per-token diffusion head: `forward` is the training loss, `sample` the reverse chain."""

    def __init__(self, token_channels: int, z_channels: int, depth: int, width: int, num_sampling_steps: int,
                 grad_checkpointing: bool = False, clip_denoised: float | None = None, noise_shift: float = 1.0):
        super().__init__()
        self.token_channels = token_channels
        # Sampling clamps the implied x_0 to the data range where it is known. The cosine schedule's first
        # reverse step multiplies any noise-prediction error by sqrt(alpha_bar_next / alpha_bar_T) (~1e3 with
        # 25 steps): a fully trained head (MAR's) predicts that noise almost exactly; a briefly trained one
        # saturates its samples without the clamp. Training is unaffected.
        self.clip_denoised = clip_denoised
        self.net = AdaLNMLP(token_channels, width, z_channels, depth, grad_checkpointing)
        self.noise_shift = noise_shift
        self.train_schedule = Schedule.cosine(shift=noise_shift)
        self.sample_schedule = Schedule.cosine(num_sampling_steps, noise_shift)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise MSE + variational bound (variance only), averaged over tokens where mask is 1.

        target: (N, C) clean token latents; z: (N, Z); mask: (N,) or None.
        """
        s = self.train_schedule
        target = target.float()
        t = torch.randint(0, s.num_steps, (target.shape[0],), device=target.device)
        noise = torch.randn_like(target)
        x_t = s.at(s.sqrt_alphas_cumprod, t, target) * target + s.at(s.sqrt_one_minus_alphas_cumprod, t, target) * noise
        eps, var_values = self.net(x_t, s.timesteps.to(t.device)[t], z).float().chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(-1)
        # the bound trains only the variance: the mean goes through a detached noise prediction
        _, log_var = split_output(s, torch.cat([eps.detach(), var_values], -1), x_t, t)
        mean, _ = posterior_mean_from_eps(s, x_t, t, eps.detach())
        true_mean = s.at(s.posterior_mean_coef1, t, x_t) * target + s.at(s.posterior_mean_coef2, t, x_t) * x_t
        true_log_var = s.at(s.posterior_log_variance, t, x_t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(target, mean, 0.5 * log_var).mean(-1) / math.log(2.0)
        loss = mse + torch.where(t == 0, nll, kl)
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def step_mean(self, z: torch.Tensor, x_t: torch.Tensor, t_index: torch.Tensor | int, cfg: float = 1.0,
                  z_uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and learned std of p(x_{t-1} | x_t, z) at respaced index t_index of the sampling schedule.

        With guidance (cfg != 1 and z_uncond given) the noise is eps_u + cfg * (eps_c - eps_u) and the
        variance is the conditional branch's. Differentiable in the head's parameters and z.
        """
        s = self.sample_schedule
        x_t = x_t.float()
        n = x_t.shape[0]
        t = torch.as_tensor(t_index, device=x_t.device).long()
        t = t.expand(n) if t.dim() == 0 else t
        timestep = s.timesteps.to(x_t.device)[t]
        if z_uncond is not None and cfg != 1.0:
            out = self.net(torch.cat([x_t, x_t]), torch.cat([timestep, timestep]), torch.cat([z, z_uncond])).float()
            out_c, out_u = out.chunk(2)
            eps_c, var_values = out_c.chunk(2, dim=-1)
            eps = out_u.chunk(2, dim=-1)[0] + cfg * (eps_c - out_u.chunk(2, dim=-1)[0])
            out = torch.cat([eps, var_values], -1)
        else:
            out = self.net(x_t, timestep, z).float()
        eps, log_var = split_output(s, out, x_t, t)
        mean, _ = posterior_mean_from_eps(s, x_t, t, eps, self.clip_denoised)
        return mean, torch.exp(0.5 * log_var)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0, z_uncond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, record: bool = False):
        """Token latents (N, C) for conditions z (N, Z); returns (x_0, DenoisingTrace | None).

        The noise is drawn with `generator` on z's device; temperature multiplies the sampling noise.
        """
        s = self.sample_schedule
        n = z.shape[0]
        x = torch.randn(n, self.token_channels, generator=generator, device=z.device)  # the chain runs in fp32
        steps: list[tuple] = []
        for i in reversed(range(s.num_steps)):
            t = torch.full((n,), i, device=z.device, dtype=torch.long)
            mean, std = self.step_mean(z, x, t, cfg, z_uncond)
            std = std * temperature if i > 0 else torch.zeros_like(std)  # the last step adds no noise
            noise = torch.randn(x.shape, generator=generator, device=z.device)
            x_prev = mean + std * noise
            if record:
                steps.append((x, x_prev, mean, std, i, int(s.timesteps[i])))
            x = x_prev
        if not record:
            return x, None
        trace = DenoisingTrace(
            x_t=torch.stack([st[0] for st in steps]),
            x_prev=torch.stack([st[1] for st in steps]),
            mean=torch.stack([st[2] for st in steps]),
            std=torch.stack([st[3] for st in steps]),
            t_index=torch.tensor([st[4] for st in steps]),
            timestep=torch.tensor([st[5] for st in steps]),
        )
        return x, trace


def step_log_prob(head: DiffLoss, z: torch.Tensor, x_t: torch.Tensor, t_index, x_prev: torch.Tensor,
                  std: torch.Tensor, cfg: float = 1.0, z_uncond: torch.Tensor | None = None):
    """(mean, log N(x_prev; mu_theta(x_t, t, z), std^2)) of one reverse step, summed over channels.

    `std` is the sigma used at rollout (learned std x temperature, as recorded in `DenoisingTrace.std`);
    the last step (std 0) is deterministic and has no density: skip it.
    """
    mean, _ = head.step_mean(z, x_t, t_index, cfg, z_uncond)
    return mean, gaussian_log_prob(x_prev, mean, std)
