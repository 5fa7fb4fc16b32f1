"""GRPO for the diffusion-head MAR (stage 3): group rollouts, rewards, advantages, the clipped objective.

One GRPO step on a batch of layouts and captions:
  1. rollout: each condition is repeated `group_size` times and sampled with trajectories recorded
     (`sample.sample_latents(record=True)`), optionally on a shorter respaced diffusion schedule;
  2. reward: the latents are decoded and scored through a reward function (images in [0, 1] and the
     grouped batch -> rewards (N,) and named components), e.g. `layout_reward` over `structmar.reward`;
  3. advantages: rewards centred on their group's mean and scaled (by the group's std by default; by one
     std over the batch, or not at all: `scale_rewards`); a group whose rewards are all equal gets 0. With
     credit="box" each box's own reward is normalised within its group and given to the tokens it covers;
     with shared_orders the rollouts of a group share their generation order;
  4. update: a transition is one denoising step of one generated token, a Gaussian
     N(x_{t-1}; mu_theta(x_t, t, z), sigma^2) with sigma as used at rollout (learned std x temperature).
     At a random `rl_step_ratio` share of the AR steps, z is recomputed with gradient from the tokens the
     backbone saw then (the final tokens outside that step's mask); at a `diffusion_step_ratio` share of
     each chain's steps the head recomputes mu_theta. Each transition's ratio to its rollout density
     enters PPO's clipped objective with its image's advantage; a closed-form KL to a frozen reference
     (equal sigma: |mu_theta - mu_ref|^2 / 2 sigma^2) is added with weight `kl_coef`.

The step's knobs (`group_size`, `rl_step_ratio`, `kl_coef`, ...) are `structmar.config.GRPOConfig`'s, each
an `rl` flag of its name.

Supervised terms beside the policy objective: `anchor_coef` keeps the model loss on the batch's own latents
(the dataset's images), and `best_of_group_coef` adds the model loss on each group's highest-reward
rollout (reward-ranked fine-tuning on the policy's own samples: a low-variance use of the same rewards);
`policy_coef` weights the clipped objective with its KL term. At 0 only the supervised terms train and
the step has no policy objective at all: rollouts keep no trajectories, no transitions are selected, the
reference computes nothing and nothing is recomputed (ratio, KL and clip fraction are not logged; the
rollout temperature is then free of `min_sigma`, e.g. the evaluation temperature for best-of-group).

The reference is a frozen copy of the stage's starting weights (`ReferencePolicy`): a DeepSpeed engine that
is never stepped, its parameters partitioned across the ranks (ZeRO-3) and offloaded to the CPU by default;
its means are computed once per rollout and reused by every update on that rollout.

Small sigma: d log N / d mu = (x_{t-1} - mu) / sigma^2 = noise / sigma, so the last cosine steps (sigma down
to a few 1e-3 at temperature 1, less at lower temperatures) dominate the gradient: on the tiny preset the
smallest-sigma step's gradient per mean was 30-50x the noisiest step's (15x the median step's).
Transitions whose rollout sigma (mean over the step) is below `min_sigma` are excluded (`sigma_mode=
"exclude"`, the default) or evaluated with sigma floored at `min_sigma` (`sigma_mode="floor"`); the last
step adds no noise and never counts. The policy runs in eval mode (no dropout), so an update's first
recomputation reproduces the rollout's log-densities exactly (ratio 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from structmar import engine as eng
from structmar.config import CREDITS, REWARD_SCALES, SIGMA_MODES, GRPOConfig
from structmar.diffusion import DenoisingTrace, DiffLoss, Schedule, gaussian_log_prob
from structmar.model import StructMAR, patchify, sample_orders, unpatchify, weights_file
from structmar.sample import ARStep, sample_latents

RewardFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# a reward function may also return, under this key of its components, each box slot's own reward (N, K)
# (aligned with the batch's box_mask; 0 at padding): what `credit="box"` assigns to the tokens of each box
BOX_REWARDS = "per_box"
# the option that keeps the KL reference's parameters on the device instead of offloading them to the CPU
RESIDENT_REFERENCE_FLAG = "--no-ref_offload"


# ---- batches and groups ---------------------------------------------------------------------------


def rows_of(batch: dict, index: torch.Tensor) -> dict:
    """The batch's rows at `index` (a bool mask or row numbers); entries that are not per-row stay whole."""
    n = batch["box_mask"].shape[0]
    return {k: v[index.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in batch.items()}


def drop_empty_layouts(batch: dict) -> tuple[dict, int]:
    """Remove rows without a real box (a layout reward needs one); returns (batch, rows removed)."""
    keep = batch["box_mask"].bool().any(1)
    dropped = int((~keep).sum())
    if dropped == 0:
        return batch, 0
    return rows_of(batch, keep), dropped


def repeat_groups(batch: dict, group_size: int) -> dict:
    """Each row repeated `group_size` times, consecutively: row i of the result is condition i // group_size."""
    return {k: v.repeat_interleave(group_size, 0) if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in batch.items() if k != "latents"}


def normalise_in_groups(r: torch.Tensor, scale: str = "group", valid: torch.Tensor | None = None,
                        eps: float = 1e-6) -> torch.Tensor:
    """Rewards r (groups, G, ...) centred on their group's mean along dim 1 and scaled by `scale` (REWARD_SCALES):
    group: by the group's own std (every group's advantages of unit spread, however small its reward gaps);
    batch: by one std, that of the centred rewards over the batch (a group whose rewards barely differ keeps
    small advantages); none: unscaled. 0 wherever a group's rewards are all equal, and outside `valid`."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale_rewards {scale!r} is not one of {REWARD_SCALES}")
    std = r.std(1, unbiased=False, keepdim=True)
    keep = (std > eps).expand_as(r)
    if valid is not None:
        keep = keep & valid
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / std.clamp(min=eps)
    elif scale == "batch" and bool(keep.any()):
        adv = adv / adv[keep].pow(2).mean().sqrt().clamp(min=eps)
    return torch.where(keep, adv, torch.zeros_like(adv))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Advantages (N,) of rewards (N,) in consecutive groups (`normalise_in_groups`; `scale` "group": (r - group
    mean) / group std); 0 where a group's rewards are all equal."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    return normalise_in_groups(rewards.float().reshape(-1, group_size), scale).reshape(-1)


def box_credit_advantages(box_rewards: torch.Tensor, box_mask: torch.Tensor, boxes: torch.Tensor,
                          image_advantages: torch.Tensor, group_size: int, grid_size: int,
                          scale: str = "group") -> torch.Tensor:
    """Per-token advantages (N, L) from each box's own reward: credit where the box's tokens are.

    Box slot k of a group holds the same box in every rollout (the layout is repeated), so its rewards
    (N, K) are normalised within the group like image rewards, with the same `scale` (0 where they are all
    equal, and at padding).
    A token takes the mean advantage of the boxes whose cells cover it (the cells of the layout bias) and
    the image's advantage where no box covers it. An image's reward mixes the outcomes of all its boxes;
    this gives each box's tokens the outcome of their own box alone.
    """
    from structmar.attention import box_cells

    N, K = box_rewards.shape
    real = box_mask.bool().cpu()
    r = box_rewards.float().cpu().reshape(-1, group_size, K)
    adv = normalise_in_groups(r, scale, valid=real.reshape(-1, group_size, K)).reshape(N, K)
    covers = box_cells(boxes.float().cpu(), real, grid_size).transpose(1, 2)  # (N, L, K)
    count = covers.sum(-1)
    token_adv = (covers * adv[:, None, :]).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, token_adv, image_advantages.float().cpu()[:, None])


def best_of_groups(ro: Rollout, group_size: int, grid_size: int) -> tuple[dict, torch.Tensor, int]:
    """The highest-reward rollout of each ranked group (rewards not all equal) as a training batch (its
    condition, its generated latents as the target), the rewards picked, and the count of ranked groups.
    With none ranked: every group's first rollout and a count of 0, for the caller to weight 0 (so that a
    rank's backward still reaches the parameters every other rank's does: ZeRO reduces them together)."""
    rewards = ro.rewards.reshape(-1, group_size)
    ranked = rewards.max(1).values > rewards.min(1).values
    rows = torch.arange(rewards.shape[0]) * group_size + rewards.argmax(1)
    if ranked.any():
        rows = rows[ranked]
    batch = rows_of(ro.batch, rows)
    batch["latents"] = unpatchify(ro.tokens[rows.to(ro.tokens.device)], grid_size)
    return batch, ro.rewards[rows], int(ranked.sum())


def layouts_of(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (boxes normalised xyxy (K, 4), category ids (K,)) of each row's real boxes."""
    out = []
    for boxes, mask, cats in zip(batch["boxes"].float().cpu(), batch["box_mask"].bool().cpu(),
                                 batch["category_ids"].cpu()):
        out.append((boxes[mask].numpy(), cats[mask].numpy()))
    return out


def layout_reward(detector, weights) -> RewardFn:
    """The detector reward of `structmar.reward` behind the reward-function interface, with each box's
    own reward under BOX_REWARDS."""
    from structmar.reward import layout_box_rewards

    def reward(images: torch.Tensor, batch: dict):
        detections = detector(images)
        rewards, components, per_box = layout_box_rewards(detections, layouts_of(batch), tuple(images.shape[-2:]),
                                                          weights)
        mask = batch["box_mask"].bool().cpu()
        slots = torch.zeros(mask.shape, dtype=torch.float32)
        slots[mask] = torch.cat(per_box)  # layouts_of keeps each row's real boxes in slot order
        return rewards, {**components, BOX_REWARDS: slots}

    return reward


def colour_reward(colour: tuple[float, float, float], tolerance: float = 0.25) -> RewardFn:
    """Share of pixels within `tolerance` (max channel difference) of an RGB colour in [0, 1]: a simple
    reward to check that the machinery optimises anything at all before a detector reward."""
    target = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1)

    def reward(images: torch.Tensor, batch: dict):
        near = ((images.float().cpu() - target).abs().amax(1) <= tolerance).float().mean((1, 2))  # (N,)
        return near, {"colour_share": near}

    return reward


# ---- the diffusion schedule of rollouts -------------------------------------------------------------


@contextlib.contextmanager
def rollout_schedule(head: DiffLoss, num_steps: int | None):
    """Sample (and recompute) on the cosine schedule respaced to `num_steps` (None: the head's own)."""
    if num_steps is None:
        yield
        return
    saved = head.sample_schedule
    head.sample_schedule = Schedule.cosine(num_steps, head.noise_shift)
    try:
        yield
    finally:
        head.sample_schedule = saved


# ---- rollouts ---------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Which transitions an update recomputes: per selected AR step, the chain indices s (ascending)."""

    ar_steps: list[int]
    chain_steps: list[torch.Tensor]  # per selected AR step: (S_sel,) long indices into its trace


@dataclass
class Rollout:
    batch: dict  # the grouped conditions (N = conditions x group_size rows), on the policy's device
    tokens: torch.Tensor  # (N, L, C) final tokens
    steps: list[ARStep]
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], on the CPU
    rewards: torch.Tensor  # (N,)
    components: dict[str, torch.Tensor]
    advantages: torch.Tensor  # (N,)
    cfg_scale: float
    token_advantages: torch.Tensor | None = None  # (N, L) with credit="box"; None: each token has its image's
    selection: Selection | None = None
    old_log_probs: list[torch.Tensor] = field(default_factory=list)  # per selected AR step: (S_sel, n_k)
    sigmas: list[torch.Tensor] = field(default_factory=list)  # per selected AR step: (S_sel, n_k, C)
    ref_means: list[torch.Tensor] = field(default_factory=list)  # per selected AR step: (S_sel, n_k, C)
    times: dict[str, float] = field(default_factory=dict)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def rollout_state(ro: Rollout) -> dict:
    """The rollout as nested dicts, lists, tensors and numbers: what a checkpoint loads with weights_only=True."""
    return _plain(ro)


def rollout_from_state(state: dict) -> Rollout:
    """The inverse of `rollout_state` (tensors stay where they were loaded; the update moves them)."""
    steps = [ARStep(**{**st, "trace": DenoisingTrace(**st["trace"])}) for st in state["steps"]]
    selection = Selection(**state["selection"]) if state["selection"] is not None else None
    return Rollout(**{**state, "steps": steps, "selection": selection})


@torch.no_grad()
def rollout(model: StructMAR, tokenizer, batch: dict, reward_fn: RewardFn, *, group_size: int, num_iter: int,
            cfg: float = 1.0, cfg_schedule: str = "constant", temperature: float = 1.0,
            num_steps: int | None = None, generator: torch.Generator | None = None, credit: str = "image",
            shared_orders: bool = False, scale_rewards: str = "group", record: bool = True) -> Rollout:
    """Sample `group_size` images per condition with trajectories, decode, score and normalise in groups.

    credit="box" also gives every token the advantage of the boxes covering it (`box_credit_advantages`),
    from the per-box rewards the reward function returns under BOX_REWARDS. `shared_orders`: the rollouts
    of a group share one generation order, so their rewards differ only through the policy's own draws
    (the order is the sampler's, not an action the objective credits). `scale_rewards`: how advantages are
    scaled after centring on the group mean (`normalise_in_groups`). `record=False` keeps no trajectories
    (`steps` is empty: for the supervised terms alone, which need the final tokens only)."""
    if credit not in CREDITS:
        raise ValueError(f"credit {credit!r} is not one of {CREDITS}")
    t0 = time.perf_counter()
    grouped = repeat_groups(batch, group_size)
    orders = None
    if shared_orders:
        n = grouped["box_mask"].shape[0] // group_size
        orders = sample_orders(n, model.cfg.seq_len, device=model.fake_latent.device,
                               generator=generator).repeat_interleave(group_size, 0)
    with rollout_schedule(model.diffloss, num_steps):
        out = sample_latents(model, grouped, num_iter=num_iter, guidance=cfg, cfg_schedule=cfg_schedule,
                             temperature=temperature, generator=generator, record=record, orders=orders)
    images = ((tokenizer.decode(out.latents.float()).float() + 1) / 2).clamp(0, 1).cpu()  # (N, 3, H, W)
    t1 = time.perf_counter()
    rewards, components = reward_fn(images, grouped)
    rewards = rewards.float().cpu()
    components = dict(components)
    box_rewards = components.pop(BOX_REWARDS, None)
    advantages = group_advantages(rewards, group_size, scale_rewards)
    token_advantages = None
    if credit == "box":
        if box_rewards is None:
            raise ValueError("credit='box' needs a reward function that returns per-box rewards (a layout reward)")
        token_advantages = box_credit_advantages(box_rewards, grouped["box_mask"], grouped["boxes"], advantages,
                                                 group_size, model.cfg.grid_size, scale_rewards)
    t2 = time.perf_counter()
    dev = out.latents.device
    grouped = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in grouped.items()}
    return Rollout(grouped, patchify(out.latents), out.steps, images, rewards,
                   {k: v.float().cpu() for k, v in components.items()}, advantages,
                   cfg_scale=cfg, token_advantages=token_advantages, times=dict(rollout=t1 - t0, reward=t2 - t1))


def eligible_chain_steps(step: ARStep, min_sigma: float, sigma_mode: str) -> torch.Tensor:
    """Chain indices of one AR step that count: noise was added, and (exclude mode) sigma >= min_sigma."""
    sigma = step.trace.std.float().mean((1, 2))  # (S,)
    ok = sigma > 0
    if sigma_mode == "exclude":
        ok &= sigma >= min_sigma
    return ok.nonzero().squeeze(1)


def select_transitions(steps: list[ARStep], rl_step_ratio: float, diffusion_step_ratio: float, min_sigma: float,
                       sigma_mode: str, generator: torch.Generator | None = None) -> Selection:
    """A random `rl_step_ratio` share of the AR steps (at least one) and, in each, a random
    `diffusion_step_ratio` share of its eligible chain steps (at least one)."""
    if sigma_mode not in SIGMA_MODES:
        raise ValueError(f"sigma_mode {sigma_mode!r} is not one of {SIGMA_MODES}")
    candidates = [k for k, st in enumerate(steps) if len(eligible_chain_steps(st, min_sigma, sigma_mode))]
    if not candidates:
        raise ValueError(f"no denoising step has sigma >= min_sigma={min_sigma}; lower --min_sigma")
    n_ar = max(1, min(len(candidates), round(rl_step_ratio * len(steps))))
    pick = torch.randperm(len(candidates), generator=generator)[:n_ar].sort().values
    ar_steps = [candidates[i] for i in pick.tolist()]
    chain_steps = []
    for k in ar_steps:
        ok = eligible_chain_steps(steps[k], min_sigma, sigma_mode)
        n = max(1, min(len(ok), round(diffusion_step_ratio * len(ok))))
        chain_steps.append(ok[torch.randperm(len(ok), generator=generator)[:n]].sort().values)
    return Selection(ar_steps, chain_steps)


def effective_sigma(std: torch.Tensor, min_sigma: float, sigma_mode: str) -> torch.Tensor:
    return std.clamp(min=min_sigma) if sigma_mode == "floor" else std


def prepare_update(ro: Rollout, selection: Selection, min_sigma: float, sigma_mode: str) -> None:
    """Store the selection, the rollout sigma and the rollout log-density of every selected transition."""
    ro.selection = selection
    ro.old_log_probs, ro.sigmas = [], []
    for k, chain in zip(selection.ar_steps, selection.chain_steps):
        tr = ro.steps[k].trace
        chain = chain.to(tr.std.device)
        sigma = effective_sigma(tr.std[chain].float(), min_sigma, sigma_mode)  # (S_sel, n_k, C)
        ro.sigmas.append(sigma)
        ro.old_log_probs.append(gaussian_log_prob(tr.x_prev[chain].float(), tr.mean[chain].float(), sigma))


def chunk_of(ro: Rollout, index: int, chunks: int) -> Rollout:
    """The rollout restricted to every `chunks`-th selected AR step, starting at `index` (1 chunk: itself)."""
    if chunks == 1:
        return ro
    keep = list(range(index, len(ro.selection.ar_steps), chunks))
    if not keep:
        raise ValueError(f"{len(ro.selection.ar_steps)} selected AR steps cannot fill {chunks} chunks "
                         "(raise --rl_step_ratio or lower --grad_accum)")
    pick = lambda items: [items[i] for i in keep]  # noqa: E731
    return dataclasses.replace(ro, selection=Selection(pick(ro.selection.ar_steps), pick(ro.selection.chain_steps)),
                               old_log_probs=pick(ro.old_log_probs), sigmas=pick(ro.sigmas),
                               ref_means=pick(ro.ref_means))


def recompute_means(model: StructMAR, ro: Rollout, num_steps: int | None) -> list[torch.Tensor]:
    """mu_theta of every selected transition, (S_sel, n_k, C) per selected AR step, on the model's device.

    Differentiable when grad is enabled: z comes from a backbone pass over the tokens the sampler's
    backbone saw at that AR step, under the same guidance.
    """
    dev = model.fake_latent.device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in ro.batch.items()}
    tokens = ro.tokens.to(dev, model.fake_latent.dtype)
    N = tokens.shape[0]
    guided = ro.cfg_scale != 1.0
    if guided:  # the sampler's layout: [conditional; unconditional] in one pass
        drop = torch.cat([torch.zeros(N, dtype=torch.bool, device=dev), torch.ones(N, dtype=torch.bool, device=dev)])
        cond = model.condition({k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}, drop)
    else:
        cond = model.condition(batch, None)
    means = []
    with rollout_schedule(model.diffloss, num_steps):
        for k, chain in zip(ro.selection.ar_steps, ro.selection.chain_steps):
            step = ro.steps[k]
            mask = step.mask.to(dev)
            seen = tokens.masked_fill(mask.unsqueeze(-1), 0)  # (N, L, C) what the backbone saw at step k
            z = model.predict(torch.cat([seen, seen]) if guided else seen, torch.cat([mask, mask]) if guided else mask,
                              cond)  # (N or 2N, L, W)
            b, t = step.batch_index.to(dev), step.token_index.to(dev)
            z_c, z_u = z[:N][b, t], (z[N:][b, t] if guided else None)  # (n_k, W)
            tr = step.trace
            chain_dev = chain.to(dev)
            x_t = tr.x_t.to(dev)[chain_dev]  # (S_sel, n_k, C)
            s, n, c = x_t.shape
            t_index = tr.t_index.to(dev)[chain_dev].repeat_interleave(n)  # (S_sel * n_k,)
            mean, _ = model.diffloss.step_mean(z_c.repeat(s, 1), x_t.reshape(s * n, c), t_index, step.cfg_scale,
                                               z_u.repeat(s, 1) if guided else None)
            means.append(mean.reshape(s, n, c))
    return means


# ---- the reference ----------------------------------------------------------------------------------


class _Means(torch.nn.Module):
    """`recompute_means` of a model as this module's forward, so a DeepSpeed engine can run it whole.

    ZeRO-3 gathers a module's parameters only around its own forward: the blocks and the head's net are
    called as modules, but StructMAR's methods read its own parameters (fake_latent, mask_token, the
    position embeddings) outside any forward, so those (and only those) are gathered for the call.
    """

    def __init__(self, model: StructMAR):
        super().__init__()
        self.model = model

    def forward(self, ro: Rollout, num_steps: int | None) -> list[torch.Tensor]:
        with eng.gathered(self.model.parameters(recurse=False)):
            return recompute_means(self.model, ro, num_steps)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class ReferencePolicy:
    """A frozen copy of the stage's starting weights, never updated.

    With a process group (`env`), as DeepSpeed runs the reference model of RLHF: a DeepSpeed engine that is
    never stepped (`engine.frozen_engine`), in the policy's `dtype`, its parameters partitioned across the
    ranks (ZeRO-3) and kept in pinned CPU memory (`offload`) or on the device, gathered onto the policy's
    device layer by layer while its means are computed there (`_Means`). Without one (tools and tests in a
    plain process): an fp32 copy on the CPU that computes there. `own=True` takes `model` itself (one built for
    the reference alone: no second whole copy in memory before the engine partitions it).
    """

    def __init__(self, model: StructMAR, env: eng.DistEnv | None = None, dtype: torch.dtype = torch.float32,
                 offload: bool = True, own: bool = False):
        import copy

        if not own:
            model = copy.deepcopy(model)
        self.model = model.to("cpu", torch.float32).eval().requires_grad_(False)
        self._digest = weights_digest(self.model)  # of the weights as given, whatever the partitions hold
        self.runner = _Means(self.model)
        if env is not None:
            self.runner = eng.frozen_engine(self.runner, env, dtype, offload, flag=RESIDENT_REFERENCE_FLAG)

    @classmethod
    def from_state_dict(cls, model_cfg, state_dict: dict, env: eng.DistEnv | None = None,
                        dtype: torch.dtype = torch.float32, offload: bool = True) -> ReferencePolicy:
        from structmar.model import load_weights

        with torch.device("cpu"), torch.random.fork_rng(devices=[]):  # its init must not move the loop's RNG
            model = StructMAR(model_cfg)
        report = load_weights(model, state_dict)
        if report.missing:
            raise ValueError(f"the reference weights lack {len(report.missing)} tensors, e.g. {report.missing[:3]}")
        return cls(model, env, dtype, offload, own=True)

    def digest(self) -> str:
        """sha256 of the starting weights in fp32 (`weights_digest`): which reference a checkpoint was trained
        against."""
        return self._digest

    @torch.no_grad()
    def means(self, ro: Rollout, num_steps: int | None, like: torch.Tensor) -> list[torch.Tensor]:
        """mu_ref of the rollout's selected transitions, in fp32 on `like`'s device."""
        return [m.to(like.device, torch.float32) for m in self.runner(ro, num_steps)]


# ---- the objective ----------------------------------------------------------------------------------


def gaussian_kl_equal_sigma(mean_p: torch.Tensor, mean_q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, sigma^2) || N(mean_q, sigma^2)) summed over the last dim: |mean_p - mean_q|^2 / (2 sigma^2)."""
    return ((mean_p - mean_q) ** 2 / (2 * sigma**2)).sum(-1)


@dataclass
class LossParts:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max_dev: torch.Tensor  # max |ratio - 1|
    clip_fraction: torch.Tensor
    num_transitions: int


def clipped_loss(ro: Rollout, means: list[torch.Tensor], clip_range: float, kl_coef: float) -> LossParts:
    """PPO's clipped objective over the selected transitions (each with its image's advantage, or its token's
    with credit="box") + kl_coef x KL.

    Averaged over transitions; the KL term is the mean closed-form KL to the reference's means.
    """
    adv_all = ro.advantages.to(means[0].device)
    surrogate, kls, ratios, clipped = [], [], [], []
    sel = ro.selection
    for k, chain, mean, old, sigma, ref in zip(sel.ar_steps, sel.chain_steps, means, ro.old_log_probs, ro.sigmas,
                                               ro.ref_means, strict=True):
        step = ro.steps[k]
        x_prev = step.trace.x_prev.to(mean.device)[chain.to(mean.device)].float()  # (S_sel, n_k, C)
        sigma = sigma.to(mean.device)
        new = gaussian_log_prob(x_prev, mean, sigma)  # (S_sel, n_k)
        ratio = torch.exp(new - old.to(mean.device))
        b = step.batch_index.to(mean.device)
        if ro.token_advantages is None:
            adv = adv_all[b].unsqueeze(0)  # (1, n_k): the image's advantage
        else:  # each token's own (credit="box")
            adv = ro.token_advantages.to(mean.device)[b, step.token_index.to(mean.device)].unsqueeze(0)
        unclipped = ratio * adv
        clip = ratio.clamp(1 - clip_range, 1 + clip_range) * adv
        surrogate.append(torch.minimum(unclipped, clip).reshape(-1))
        kls.append(gaussian_kl_equal_sigma(mean, ref.to(mean.device), sigma).reshape(-1))
        ratios.append(ratio.detach().reshape(-1))
        clipped.append(((ratio.detach() - 1).abs() > clip_range).float().reshape(-1))
    surrogate_all, kl_all, ratio_all = torch.cat(surrogate), torch.cat(kls), torch.cat(ratios)
    policy_loss = -surrogate_all.mean()
    kl = kl_all.mean()
    return LossParts(policy_loss + kl_coef * kl, policy_loss.detach(), kl.detach(), ratio_all.mean(),
                     (ratio_all - 1).abs().max(), torch.cat(clipped).mean(), int(ratio_all.numel()))


class GRPOObjective:
    """rollout -> reward -> advantages -> clipped loss, as an objective of the training loop.

    `loss(model, batch)` returns (loss, metrics) like `StructMAR.forward`. With `inner_steps` > 1, a
    rollout serves that many consecutive updates (the batch of the later calls is ignored). `ar_chunks` is
    the loop's gradient accumulation (`--grad_accum`), the backward passes per update: each takes every
    `ar_chunks`-th selected AR step, so only that chunk's graph is alive at a time, and the passes' gradients
    sum to the update's.
    """

    def __init__(self, settings: GRPOConfig, tokenizer, reward_fn: RewardFn, reference: ReferencePolicy,
                 generator: torch.Generator | None = None, ar_chunks: int = 1):
        self.s = settings
        self.ar_chunks = ar_chunks
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.reference = reference
        self.generator = generator
        self.current: Rollout | None = None
        self.uses = 0
        self.dropped_rows = 0

    def state_dict(self) -> dict:
        """What a continued run needs to go on exactly: the rollout still in use (`inner_steps` > 1 and a
        checkpoint inside it; None otherwise) with its use count, and the count of dropped rows."""
        in_use = self.current is not None and self.uses < self.s.inner_steps * self.ar_chunks
        return {"rollout": rollout_state(self.current) if in_use else None, "uses": self.uses if in_use else 0,
                "dropped_rows": self.dropped_rows}

    def load_state_dict(self, state: dict) -> None:
        self.current = rollout_from_state(state["rollout"]) if state["rollout"] is not None else None
        self.uses, self.dropped_rows = state["uses"], state["dropped_rows"]

    def _kernels(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH) if self.s.math_attention else contextlib.nullcontext()

    @property
    def policy_free(self) -> bool:
        """No policy objective (policy_coef 0): no trajectories, selection, reference or recomputation."""
        return self.s.policy_coef == 0

    def new_rollout(self, model: StructMAR, batch: dict) -> Rollout:
        s = self.s
        batch, dropped = drop_empty_layouts(batch)
        self.dropped_rows += dropped
        if batch["box_mask"].shape[0] == 0:
            raise ValueError("every layout of the batch has no box; the RL loader must drop those")
        model.eval()  # no dropout: the update must see the rollout's policy exactly
        with self._kernels():
            ro = rollout(model, self.tokenizer, batch, self.reward_fn, group_size=s.group_size, num_iter=s.num_iter,
                         cfg=s.rollout_cfg, cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                         num_steps=s.rollout_steps, generator=self.generator, credit=s.credit,
                         shared_orders=s.shared_orders, scale_rewards=s.scale_rewards,
                         record=not self.policy_free)
        if self.policy_free:
            ro.times["reference"] = 0.0
            return ro
        selection = select_transitions(ro.steps, s.rl_step_ratio, s.diffusion_step_ratio, s.min_sigma,
                                       s.sigma_mode, generator=self.generator)
        prepare_update(ro, selection, s.min_sigma, s.sigma_mode)
        t0 = time.perf_counter()
        with self._kernels():
            ro.ref_means = self.reference.means(ro, s.rollout_steps, like=ro.tokens)
        ro.times["reference"] = time.perf_counter() - t0
        return ro

    def loss(self, model: StructMAR, batch: dict) -> tuple[torch.Tensor, dict]:
        s = self.s
        if self.current is None or self.uses >= s.inner_steps * self.ar_chunks:
            self.current, self.uses = self.new_rollout(model, batch), 0
        ro = self.current if self.policy_free else chunk_of(self.current, self.uses % self.ar_chunks, self.ar_chunks)
        first_use = self.uses == 0
        self.uses += 1
        model.eval()
        t0 = time.perf_counter()
        loss = torch.zeros((), device=ro.tokens.device)
        metrics = {
            "reward_mean": ro.rewards.mean(), "reward_std": ro.rewards.std(unbiased=False),
            "advantage_mean": ro.advantages.mean(), "advantage_std": ro.advantages.std(unbiased=False),
            "advantage_abs_max": ro.advantages.abs().max(),
            "zero_std_groups": (ro.advantages.reshape(-1, s.group_size).abs().sum(1) == 0).float().mean(),
        }
        if not self.policy_free:
            with self._kernels():
                means = recompute_means(model, ro, s.rollout_steps)
            parts = clipped_loss(ro, means, s.clip_range, s.kl_coef)
            loss = s.policy_coef * parts.loss
            metrics.update(policy_loss=parts.policy_loss, kl=parts.kl, ratio_mean=parts.ratio_mean,
                           ratio_max_dev=parts.ratio_max_dev, clip_fraction=parts.clip_fraction,
                           transitions=torch.tensor(float(parts.num_transitions)))
        metrics.update({f"reward_{k}": v.mean() for k, v in ro.components.items()})
        if s.anchor_coef > 0:
            if "latents" not in batch:
                raise ValueError("anchor_coef > 0 needs the batch's latents for the supervised loss")
            anchor, _ = model(batch)
            loss = loss + s.anchor_coef * anchor
            metrics["anchor_loss"] = anchor.detach()
        if s.best_of_group_coef > 0:
            best, picked, ranked = best_of_groups(ro, s.group_size, model.cfg.grid_size)
            own, _ = model(best)
            loss = loss + s.best_of_group_coef * float(ranked > 0) * own
            metrics.update(best_of_group_loss=own.detach(), best_of_group_reward=picked.mean(),
                           ranked_groups=ranked / (ro.rewards.shape[0] // s.group_size))
        if first_use:  # time the rollout once per rollout; images/s over the rollout alone
            metrics.update({"time_rollout_s": ro.times["rollout"], "time_reward_s": ro.times["reward"],
                            "time_reference_s": ro.times["reference"],
                            "rollout_images_per_s": ro.images.shape[0] / max(ro.times["rollout"], 1e-9)})
        metrics["time_loss_forward_s"] = time.perf_counter() - t0
        return loss, {k: torch.as_tensor(v, dtype=torch.float32).detach() for k, v in metrics.items()}



def gradient_signal_share(estimates: list[torch.Tensor], per_coordinate: bool = False) -> float:
    """From K >= 2 independent gradient estimates g_i = mu + noise_i: |mu|^2 / E|g|^2, the share of an
    estimate's squared norm that is signal (mean pairwise dot product over mean squared norm; 1: noiseless,
    ~0: noise). Averaging n such estimates (n x the rollouts per step) lifts a small share s to about n s.

    With `per_coordinate`, each coordinate's own share mu_j^2 / E g_j^2, averaged over the coordinates that
    have a gradient: the share an optimiser sees that scales every coordinate by its own RMS, as Adam does,
    where a few noisy coordinates dominating the norm no longer hide the signal of the others."""
    if len(estimates) < 2:
        raise ValueError(f"the signal share needs at least 2 gradient estimates, got {len(estimates)}")
    g = torch.stack([e.detach().double().reshape(-1) for e in estimates])  # (K, P)
    k = g.shape[0]
    total, squares = g.sum(0), (g * g).sum(0)
    pair_dots = (total * total - squares) / (k * (k - 1))  # per coordinate: mean of g_ij g_lj over i != l
    if per_coordinate:
        live = squares > 0
        return float((pair_dots[live] / (squares[live] / k)).mean())
    return float(pair_dots.sum() / squares.sum() * k)


# ---- stage 3 as an objective of the training loop ----------------------------------------------------


class GRPOStage:
    """Stage 3 as an objective of the training loop (`structmar.train.Objective`): which parameters train,
    the GRPO loss, and its state.

    Built before any process group or rollout, so a missing or wrong detector fails first. `prepare`
    runs once the policy is built: it makes the tokenizer and the frozen reference from the --resume
    weights. The reference is the stage's start, never updated: a checkpoint records its file and sha256,
    and a continued run (`load_state_dict`) keeps the recorded one, rebuilding it from the recorded file
    when --resume now names other weights (e.g. this run's own directory, whose export has moved on).
    """

    name = "grpo"
    forward_only = False  # rollouts call the policy's methods outside forward: ZeRO stage 0-2

    def __init__(self, cfg, categories: dict[int, str] | None = None, reward_fn: RewardFn | None = None):
        from structmar.reward import RewardWeights, load_detector

        self.cfg = cfg.validate()
        if reward_fn is None:
            detector = load_detector(cfg.detector, cfg.detector_path, categories,
                                     device="cuda" if cfg.device == "cuda" else "cpu",
                                     score_threshold=cfg.detector_threshold)
            weights = RewardWeights(cfg.reward_iou, cfg.reward_confidence, cfg.reward_centroid, cfg.reward_missing)
            reward_fn = layout_reward(detector, weights)
        self.reward_fn = reward_fn
        self.objective: GRPOObjective | None = None
        self.model_cfg = None
        self.reference_source: dict | None = None  # {"path", "sha256"} of the reference weights

    def trainable(self, name: str) -> bool:
        return self.cfg.train_head or not name.startswith("diffloss.")

    def prepare(self, model_cfg, seed: int) -> None:
        from structmar.model import read_weights
        from structmar.tokenizer import build_tokenizer, vae_path_for

        c = self.cfg
        path = os.path.abspath(weights_file(c.resume))
        weights = read_weights(path)
        tokenizer = build_tokenizer(model_cfg.tokenizer, vae_path=vae_path_for(c.vae_path, weights.trained_with),
                                    pixel_patch=model_cfg.pixel_patch)
        self.model_cfg = model_cfg
        reference = self._reference(weights.select(ema=c.init_ema))
        self.reference_source = {"path": path, "sha256": reference.digest()}
        self.objective = GRPOObjective(c.grpo, tokenizer.eval(), self.reward_fn, reference, ar_chunks=c.grad_accum,
                                       generator=None)  # rollouts draw from the loop's seeded torch RNG (seed)

    def _reference(self, state_dict: dict) -> ReferencePolicy:
        """The frozen reference over this run's ranks, in the policy's dtype, its parameters offloaded to the CPU
        (--ref_offload, the default) or resident on the device; it computes on the policy's device either way."""
        c = self.cfg
        return ReferencePolicy.from_state_dict(self.model_cfg, state_dict, env=eng.init_distributed(c.device),
                                               dtype=torch.bfloat16 if c.precision == "bf16" else torch.float32,
                                               offload=c.ref_offload)

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint: the reference's source and the objective's state."""
        return {"reference": dict(self.reference_source), **self.objective.state_dict()}

    def load_state_dict(self, state: dict, same_ranks: bool = True) -> None:
        """Continue from a checkpoint's `state_dict()`; with another world size (`same_ranks` False) the rollout
        in use, saved by one rank, is dropped (the next step rolls out afresh)."""
        from structmar.model import read_weights

        saved = state["reference"]
        if saved["sha256"] != self.reference_source["sha256"]:
            path = saved["path"]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"this run's KL reference {path} is gone, and --resume "
                                        f"{self.reference_source['path']} holds other weights; restore the file")
            reference = self._reference(read_weights(path).model)
            if reference.digest() != saved["sha256"]:
                raise ValueError(f"this run's KL reference {path} changed since the run started (sha256 differs); "
                                 "restore the stage's starting weights or start a new --output_dir")
            self.objective.reference, self.reference_source = reference, dict(saved)
        objective_state = {k: v for k, v in state.items() if k != "reference"}
        if not same_ranks:
            objective_state.update(rollout=None, uses=0)
        self.objective.load_state_dict(objective_state)

    def loss(self, model: StructMAR, batch: dict) -> tuple[torch.Tensor, dict]:
        tokenizer = self.objective.tokenizer
        if next(tokenizer.parameters(), None) is not None:
            tokenizer.to(model.fake_latent.device)
        loss, metrics = self.objective.loss(model, batch)
        metrics["dropped_empty_layouts"] = torch.tensor(float(self.objective.dropped_rows))
        return loss, metrics


def build_stage(cfg) -> GRPOStage:
    """Validate the RL config and load the reward detector (the dataset's categories from the shard
    manifest), so a missing or wrong detector fails before any process group or rollout."""
    from structmar.shards import read_manifest

    cfg.validate()
    weights_file(cfg.resume)
    categories = None
    if cfg.detector != "shapes":
        manifest = read_manifest(cfg.shard_dir, cfg.coco_split)
        categories = {int(k): v for k, v in manifest["categories"].items()}
    return GRPOStage(cfg, categories)


def run_rl(cfg):
    """`structmar rl`: stage 3 through the one training loop, with GRPO as its objective."""
    from structmar.train import train

    return train(cfg, objective=build_stage(cfg))
