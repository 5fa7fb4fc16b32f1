"""Iterative masked generation (MAR's sampler) with CFG, temperature and optional trajectory recording.

Each of `num_iter` steps runs the backbone on the current tokens, then the diffusion head samples the
tokens that leave the mask at this step: after step k, floor(L * cos(pi/2 * (k+1) / num_iter)) tokens
stay masked (at least one token is generated per step; the last step generates all that remain), in a
random order per image. The CFG scale is constant or linear in the share of tokens already generated;
the unconditional branch is the null text + null layout condition. With `record=True` every generated
token's reverse diffusion chain is kept (x_t, x_{t-1}, mean, std, AR step, token index, timestep): what
GRPO needs to recompute log N(x_{t-1}; mu_theta(x_t, t, z), sigma^2) with `diffusion.step_log_prob`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from structmar.diffusion import DenoisingTrace
from structmar.model import StructMAR, mask_by_order, sample_orders, unpatchify


@dataclass
class ARStep:
    """One autoregressive step of a recorded rollout.

    mask: (B, L) bool, the tokens still unknown when the step ran (the backbone's input mask);
    batch_index, token_index: (N,) which tokens this step generated; cfg_scale: the guidance used;
    trace: their reverse diffusion chains (x_t etc. of shape (S, N, C)).
    """

    ar_step: int
    mask: torch.Tensor
    batch_index: torch.Tensor
    token_index: torch.Tensor
    cfg_scale: float
    trace: DenoisingTrace


@dataclass
class SampleOutput:
    latents: torch.Tensor  # (B, C, g, g) scaled tokenizer latents
    orders: torch.Tensor  # (B, L) the generation order
    steps: list[ARStep] = field(default_factory=list)  # filled when recording


def _repeat_batch(batch: dict, times: int) -> dict:
    return {k: torch.cat([v] * times) if torch.is_tensor(v) else v for k, v in batch.items()}


def cfg_scale_at(cfg: float, schedule: str, num_masked_after: int, seq_len: int) -> float:
    """Guidance of a step: constant, or linear from 1 to `cfg` in the share of tokens generated after it."""
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (seq_len - num_masked_after) / seq_len
    raise ValueError(f"unknown cfg schedule {schedule!r}; known: linear, constant")


@torch.no_grad()
def sample_latents(model: StructMAR, batch: dict, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                   temperature: float = 1.0, generator: torch.Generator | None = None,
                   record: bool = False) -> SampleOutput:
    """Generate token latents for the conditions in `batch` (text/layout keys of the training batch contract).

    The batch size comes from `text_pooled` (or `boxes`); every random draw uses `generator`.
    """
    mcfg = model.cfg
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    cfg_scale_at(cfg, cfg_schedule, 0, 1)  # validate the schedule name before any work
    ref = batch.get("text_pooled", batch.get("boxes"))
    if ref is None:
        raise ValueError("the sampling batch needs 'text_pooled' or 'boxes' to know its size")
    B, L, C = ref.shape[0], mcfg.seq_len, mcfg.token_channels
    dev = model.fake_latent.device
    dtype = model.fake_latent.dtype
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items() if k != "latents"}
    guided = cfg != 1.0
    if guided:  # one pass over [conditional; unconditional]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool, device=dev), torch.ones(B, dtype=torch.bool, device=dev)])
        cond = model.condition(_repeat_batch(batch, 2), drop)
    else:
        cond = model.condition(batch, None)

    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    tokens = torch.zeros(B, L, C, device=dev, dtype=dtype)
    orders = sample_orders(B, L, device=dev, generator=generator)
    out = SampleOutput(latents=tokens, orders=orders)
    for step in range(num_iter):
        z = model.predict(torch.cat([tokens] * 2) if guided else tokens, torch.cat([mask] * 2) if guided else mask,
                          cond)  # (B or 2B, L, W)
        remaining = int(mask[0].sum())
        num_masked = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
        num_masked = max(1, min(remaining - 1, num_masked))
        mask_next = mask_by_order(num_masked, orders)
        to_pred = mask if step == num_iter - 1 else mask & ~mask_next
        scale = cfg_scale_at(cfg, cfg_schedule, num_masked, L)
        b_idx, t_idx = to_pred.nonzero(as_tuple=True)
        z_cond = z[:B][b_idx, t_idx]
        z_uncond = z[B:][b_idx, t_idx] if guided else None
        x, trace = model.diffloss.sample(z_cond, temperature, scale, z_uncond, generator=generator, record=record)
        if record:
            out.steps.append(ARStep(step, mask.clone(), b_idx, t_idx, scale, trace))
        tokens = tokens.clone()
        tokens[b_idx, t_idx] = x.to(tokens.dtype)
        mask = mask_next if step < num_iter - 1 else torch.zeros_like(mask)
    out.latents = unpatchify(tokens, mcfg.grid_size)
    return out


@torch.no_grad()
def generate_images(model: StructMAR, tokenizer, batch: dict, **kwargs) -> tuple[torch.Tensor, SampleOutput]:
    """Sample latents and decode them: images in [-1, 1] (B, 3, S, S) and the SampleOutput."""
    out = sample_latents(model, batch, **kwargs)
    return tokenizer.decode(out.latents), out
