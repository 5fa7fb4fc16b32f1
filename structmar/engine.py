"""Parallelism applied from outside: process group, DeepSpeed engine, EMA, checkpoints, logging.

This is the only module that imports deepspeed; the model never sees ranks or devices. One `Engine`
wraps a DeepSpeed engine built from a ZeRO json (one of ds_configs/ in the package, or the user's) whose batch,
lr and precision entries are filled here from the CLI, so no "auto" value ever reaches DeepSpeed.

Checkpoint layout of a run (`<output_dir>/checkpoints/`):
    <tag>/                DeepSpeed's files (module, optimizer partitions) plus
    <tag>/trainer_state.json         step, epoch, world size, ZeRO stage, TrainConfig, ModelConfig
    <tag>/rank_<r>.pt                this rank's RNG states, data position and EMA (shard)
    latest                the tag of the newest complete checkpoint, replaced atomically last
A kill during a save, or a save that fails (a full disk), leaves `latest` naming the previous, complete tag; the
run that continues from it removes the half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from structmar import atomic
from structmar.config import OptimizerConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
# Keys the engine fills from the CLI; a ZeRO json must not set them.
_CLI_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OPTIMIZER_KEYS = ("optimizer", "gradient_clipping")  # the stage config's (OptimizerConfig)
# what _fill_launcher_env and init_distributed may set in os.environ
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
DS_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_configs")  # the packaged ZeRO jsons


# ---- process group --------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list ("gpu[01-04,07],cpu1" -> "gpu01"), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist)
        if not m:
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR") from None
        return m.group(1) + (m.group(2) or "")


def _in_srun_step(env) -> bool:
    return "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def _fill_launcher_env(env) -> None:
    """Give torch.distributed its RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* under srun or a plain process.

    The deepspeed launcher and torchrun set them already; srun sets only SLURM_* variables; a plain
    process is a world of one on a free local port.
    """
    if "RANK" in env:
        return
    if _in_srun_step(env):
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_STEP_NODELIST", env["SLURM_JOB_NODELIST"])))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_distributed(device: str) -> DistEnv:
    """Join (or form) the process group for `device` ("cuda": nccl, one GPU per local rank; "cpu": gloo)."""
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its accelerator at import
    elif not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible; use --device cpu")
    _fill_launcher_env(os.environ)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
        if device == "cpu":
            _release_shm_workspace()
    torch_device = torch.device("cpu") if device == "cpu" else torch.device("cuda", local_rank)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)


@contextlib.contextmanager
def process_group_scope():
    """Leave a process without a launcher as it was: the world that `init_distributed` forms inside is destroyed
    on the way out and the variables it set (RANK, MASTER_PORT, ...) are put back, so the process can train
    again or start a launcher (whose ranks would inherit the port this process held). Under a launcher (the
    deepspeed launcher, torchrun, srun) the process group is the job's and stays for what the process does next."""
    saved = {name: os.environ.get(name) for name in _LAUNCHER_VARIABLES}
    formed_here = not dist.is_initialized() and "RANK" not in os.environ and not _in_srun_step(os.environ)
    try:
        yield
    finally:
        if formed_here and dist.is_initialized():
            import deepspeed

            deepspeed.comm.destroy_process_group()  # torch's group and DeepSpeed's references to it
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shm_workspace(rank: int) -> str:
    """The /dev/shm path of `rank`'s DeepSpeed shared-memory allreduce workspace in this process group."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed shared-memory allreduce workspace, keeping its mappings.

    DeepSpeed's CPU backend creates a 66 MB /dev/shm segment per rank when all ranks share a node (the
    launcher sets LOCAL_SIZE) and never unlinks it, so every CPU run under the launcher left 66 MB of RAM
    per rank in /dev/shm until reboot. Once init_distributed has returned, every rank has mapped all its
    peers' segments, so after a barrier each rank unlinks its own name: the memory lives on while the
    processes run and is freed when they exit, however they exit.
    """
    dist.barrier()  # no peer may still be waiting to open this rank's segment
    with contextlib.suppress(FileNotFoundError):  # a world not on one node, or no shared-memory op
        os.unlink(shm_workspace(dist.get_rank()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks take the same branch)."""
    t = torch.tensor([float(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """`values` summed element-wise over the ranks (every rank must call it)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---- DeepSpeed config -----------------------------------------------------------------------


def _find_auto(node, path="") -> str | None:
    if isinstance(node, str) and node == "auto":
        return path or "<root>"
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{path}.{k}" if path else k)
            if hit:
                return hit
    if isinstance(node, list):
        for i, v in enumerate(node):
            hit = _find_auto(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def packaged_ds_configs() -> list[str]:
    """The names of the ZeRO jsons shipped in the package (zero2, zero3, ...)."""
    return sorted(name.removesuffix(".json") for name in os.listdir(DS_CONFIGS) if name.endswith(".json"))


def resolve_ds_config(name: str) -> str:
    """The path of ZeRO json `name`: the file at that path, else the packaged one so named ("zero2", "zero2.json")."""
    if os.path.isfile(name):
        return name
    packaged = os.path.join(DS_CONFIGS, name if name.endswith(".json") else name + ".json")
    if os.path.basename(name) == name and os.path.isfile(packaged):
        return packaged
    raise FileNotFoundError(f"DeepSpeed config {name} does not exist; name a packaged one "
                            f"({', '.join(packaged_ds_configs())}) or a json file")


def build_ds_config(
    path: str,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    optimizer: OptimizerConfig,
    precision: str,
    load_universal: bool = False,
) -> dict:
    """The ZeRO json `path` (see `resolve_ds_config`) completed with the batch sizes, the optimizer (AdamW: lr,
    betas, eps, weight decay; gradient clipping) and precision the CLI decided."""
    path = resolve_ds_config(path)
    with open(path) as f:
        cfg = json.load(f)
    hit = _find_auto(cfg)
    if hit:
        raise ValueError(f"{path}: {hit} is 'auto'; raw DeepSpeed has no 'auto' (the engine fills batch/lr from flags)")
    for key in _CLI_KEYS:
        if key in cfg:
            raise ValueError(f"{path} sets {key}; batch sizes come from --batch_size and --grad_accum")
    for key in _OPTIMIZER_KEYS:
        if key in cfg:
            raise ValueError(f"{path} sets {key}; the optimizer comes from --lr, --adam_betas, --adam_eps, "
                             "--weight_decay and --grad_clip")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if "offload_param" in cfg.get("zero_optimization", {}) and stage != 3:
        raise ValueError(f"{path}: offload_param needs ZeRO stage 3, the config has stage {stage}")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    cfg["optimizer"] = {"type": "AdamW", "params": {"betas": list(optimizer.adam_betas), "eps": optimizer.adam_eps,
                                                    "weight_decay": optimizer.weight_decay, "lr": lr}}
    cfg["gradient_clipping"] = optimizer.grad_clip
    if precision == "bf16":
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": True}
        # bf16 gradient accumulation loses small contributions; accumulate in fp32
        cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    else:
        cfg["bf16"] = {"enabled": False}
        cfg.pop("data_types", None)
    cfg.pop("fp16", None)
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    cfg.setdefault("steps_per_print", 1 << 30)  # the trainer logs; keep DeepSpeed's own step prints off
    return cfg


def _weight_decay_groups(model: torch.nn.Module) -> list[dict]:
    """Decay matrices only: biases, norms and other 1-D parameters get no weight decay (as MAR)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- EMA ------------------------------------------------------------------------------------


def _local_partition(full: torch.Tensor, p, env: DistEnv) -> torch.Tensor:
    """This rank's slice of `full` as ZeRO-3 partitions p: flat, padded at the end, equal sizes."""
    part = p.ds_tensor.numel()
    flat = full.detach().reshape(-1).float()
    flat = torch.nn.functional.pad(flat, (0, part * env.world_size - flat.numel()))
    return flat[env.rank * part : (env.rank + 1) * part].clone()


class Engine:
    """A DeepSpeed engine plus an fp32 EMA, the step with non-finite-loss skipping, and checkpoints.

    EMA: keyed by parameter name, fed from the fp32 master weights, never gathered per step.
    ZeRO-3: each rank keeps the EMA of its own partition of each parameter. ZeRO-1/2: one whole
    tensor per parameter on every rank, of which each rank updates the fragment whose fp32 master it
    owns; `_sync_ema` sums the fragments over ranks before a save or export. Frozen parameters are
    kept in fp32 inside the EMA store (their EMA is their value), so a bf16 engine still exports them
    bit-identical to what was loaded.
    """

    def __init__(self, model: torch.nn.Module, ds_config: dict, env: DistEnv, ema_rate: float,
                 loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]], *, forward_only: bool = False,
                 compile: str | None = None):
        """`loss_fn(model, batch) -> (loss, metrics)` is the objective of every step. `forward_only`: it calls
        nothing of `model` but `model(batch)`, and gets the DeepSpeed engine, whose forward gathers ZeRO-3
        partitions and hooks DeepSpeed's backward (any ZeRO stage); otherwise it gets the bare module.
        `compile`: a torch.compile backend the model's forward (and so its backward) runs compiled by;
        forward-only objectives only, since nothing but `model(batch)` would be compiled."""
        import deepspeed

        if compile and not forward_only:
            raise ValueError("compiling the model's forward needs an objective that calls only the model's forward")
        if not forward_only and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            # ZeRO-3 gathers a module's own parameters only around its forward(); an objective that calls
            # other methods (rollouts) would read empty partitions
            raise ValueError("an objective other than the model's forward needs ZeRO stage 0-2, not 3")
        self.env = env
        self.ema_rate = ema_rate
        self.loss_fn = loss_fn
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("no trainable parameters (check --train_mode)")
        # the weights as loaded, in fp32: the EMA starts here (a bf16 engine keeps only rounded copies)
        initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=_weight_decay_groups(model), config=ds_config
        )
        if compile:
            # DeepSpeed's engine.compile() rather than torch.compile(model): it compiles the module in place
            # (nn.Module.compile), so parameter names, checkpoints and the EMA's keys stay those of the eager model
            # (torch.compile's wrapper would prefix them `_orig_mod.`); DeepSpeed's own forward (its backward
            # hooks, gradient-accumulation scaling) stays eager around the compiled module, and its ZeRO-3
            # gather/release hooks are marked torch.compiler.disable, so they run between the compiled graphs
            self.ds.compile(backend=compile)
        self.module = self.ds.module
        self.loss_model = self.ds if forward_only else self.module  # what loss_fn is handed
        self.zero_stage = self.ds.zero_optimization_stage()
        self.dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        self.params = dict(self.module.named_parameters())
        self.ema: dict[str, torch.Tensor] = {}
        trainable = set(self.trainable)
        for name, p in self.params.items():
            src = initial.pop(name)
            if not self.sharded:
                self.ema[name] = src.to(p.device)
                continue
            # ZeRO-3: next to the fp32 master partition (CPU under optimizer offload)
            device = self._master(name, p).device if name in trainable else p.ds_tensor.device
            self.ema[name] = _local_partition(src, p, env).to(device)

    # -- state of the weights ------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.zero_stage == 3

    def _master(self, name: str, p) -> torch.Tensor:
        """The fp32 value this rank holds of a trainable parameter (its partition under ZeRO-3)."""
        if self.sharded:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).detach().reshape(-1).float()
        return p.detach().float()

    @property
    def fragmented(self) -> bool:
        """ZeRO-1/2 (and DeepSpeed's bf16 optimizer): each rank owns the fp32 master of a fragment of each weight."""
        return not self.sharded and any(hasattr(self.params[n], "_hp_mapping") for n in self.trainable)

    def update_ema(self) -> None:
        rate = self.ema_rate
        fragmented = self.fragmented
        for name in self.trainable:
            p, ema = self.params[name], self.ema[name]
            if not fragmented:
                ema.mul_(rate).add_(self._master(name, p), alpha=1.0 - rate)
                continue
            frag = p._hp_mapping
            if frag is None:  # this rank owns no part of this weight
                continue
            address = frag.lp_fragment_address
            own = ema.view(-1).narrow(0, address.start, address.numel)
            own.mul_(rate).add_(frag.get_hp_fragment().reshape(-1).to(own.device), alpha=1.0 - rate)

    def _sync_ema(self) -> None:
        """Make every rank's whole EMA current: sum the fragments each rank owns (collective, ZeRO-1/2)."""
        if not self.fragmented:
            return
        for name in self.trainable:
            p, ema = self.params[name], self.ema[name]
            mine = torch.zeros_like(ema).view(-1)
            if p._hp_mapping is not None:
                address = p._hp_mapping.lp_fragment_address
                mine.narrow(0, address.start, address.numel).copy_(ema.view(-1).narrow(0, address.start,
                                                                                        address.numel))
            dist.all_reduce(mine, group=p._dp_group)
            ema.copy_(mine.view_as(ema))

    def _gather(self, local: torch.Tensor, p) -> torch.Tensor:
        """Whole tensor from the ranks' ZeRO-3 partitions (collective), on CPU."""
        parts = [torch.empty_like(local) for _ in range(self.env.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()

    def consolidated(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(model, ema) whole fp32 tensors on CPU, keyed like the model's state_dict. Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        self._sync_ema()
        model_sd, ema_sd = {}, {}
        trainable = set(self.trainable)
        for name, p in self.params.items():
            if self.sharded:
                ema = self._gather(self.ema[name], p)
                value = safe_get_full_fp32_param(p).reshape(p.ds_shape).cpu() if name in trainable else ema
            else:
                ema = self.ema[name].cpu()
                value = p.detach().float().cpu() if name in trainable else ema
                if name in trainable and hasattr(p, "_hp_mapping"):
                    value = safe_get_full_fp32_param(p).cpu()  # the fp32 master, not the bf16 copy
            model_sd[name], ema_sd[name] = value.float().clone(), ema.float().clone()
        for name, b in _persistent_buffers(self.module):
            model_sd[name] = ema_sd[name] = b.detach().cpu().clone()
        return model_sd, ema_sd

    # -- one micro-batch -----------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        """Move a batch to this rank's device; floating tensors take the engine's dtype."""
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.env.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def train_step(self, batch: dict, lr: float) -> StepResult:
        """Forward, backward and (at an accumulation boundary) the optimizer step and EMA update.

        A non-finite loss on any rank skips this micro-batch on all ranks: no backward, weights unchanged.
        """
        batch = self.to_device(batch)
        loss, metrics = self.loss_fn(self.loss_model, batch)
        names = sorted(metrics)
        local = torch.stack([loss.detach().float()] + [metrics[k].detach().float().reshape(()) for k in names])
        finite = torch.isfinite(local).all()
        # one collective: mean of loss/metrics over ranks and the count of ranks that went non-finite
        packed = torch.cat([torch.where(finite, local, torch.zeros_like(local)), (~finite).float().reshape(1)])
        if self.env.world_size > 1:
            dist.all_reduce(packed)
        bad_ranks = int(packed[-1].item())
        if bad_ranks:
            return StepResult(float("nan"), {}, None, skipped=True, applied=False)
        mean = (packed[:-1] / self.env.world_size).tolist()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)
        self.ds.step()
        grad_norm = None
        if boundary:
            self.update_ema()
            norm = self.ds.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        return StepResult(mean[0], dict(zip(names, mean[1:], strict=True)), grad_norm, skipped=False, applied=boundary)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, run_dir: str, tag: str, trainer_state: dict, rank_state: dict, keep: int) -> None:
        """Write checkpoint `tag` under <run_dir>/checkpoints and point `latest` at it. Every rank calls it.

        A save that fails part-way (a full disk, a rank that died) raises atomic.SaveError, one line saying that
        `latest` still names the previous checkpoint; the half-written tag stays until the run continues."""
        ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
        tag_dir = os.path.join(ckpt_dir, tag)
        previous = latest_checkpoint(run_dir)
        try:
            self.ds.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
            self._sync_ema()
            own = dict(rank_state)
            if self.sharded or self.env.is_main:  # ZeRO-0/1/2: the EMA is identical on every rank
                own["ema"] = {n: t.cpu() for n, t in self.ema.items()}
                own["ema_layout"] = "partition" if self.sharded else "full"
            atomic.torch_save(own, os.path.join(tag_dir, f"rank_{self.env.rank:05d}.pt"))
            if self.env.is_main:
                state = dict(trainer_state, world_size=self.env.world_size, zero_stage=self.zero_stage, tag=tag)
                atomic.write_text(os.path.join(tag_dir, TRAINER_STATE), json.dumps(state, indent=1))
            barrier()
            if self.env.is_main:
                atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)
        except (OSError, RuntimeError) as e:  # torch.save and gloo report a full disk or a lost peer as RuntimeError
            intact = (f"the previous checkpoint {previous[0]} is intact and `latest` names it: rerun the command to "
                      "continue from it" if previous else "the run has no earlier checkpoint")
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise atomic.SaveError(f"checkpoint {tag} in {ckpt_dir} was not completed ({reason}); {intact}") from e
        if self.env.is_main:
            prune_checkpoints(ckpt_dir, keep, current=tag)
        barrier()

    def load(self, run_dir: str, tag: str, saved_world_size: int) -> dict:
        """Restore module, optimizer and EMA from checkpoint `tag`; returns this rank's saved state.

        With another world size the DeepSpeed part is read from the universal conversion of the tag
        (see `prepare_universal`) and the EMA shards are reassembled by name; the per-rank state
        returned is then rank 0's (RNG states do not carry over between world sizes).
        """
        ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
        same_world = saved_world_size == self.env.world_size
        ds_tag = tag if same_world else tag + UNIVERSAL_SUFFIX
        path, _ = self.ds.load_checkpoint(ckpt_dir, tag=ds_tag, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {ds_tag} in {ckpt_dir}")
        tag_dir = os.path.join(ckpt_dir, tag)
        own_file = os.path.join(tag_dir, f"rank_{(self.env.rank if same_world else 0):05d}.pt")
        own = torch.load(own_file, map_location="cpu", weights_only=True)
        self._load_ema(tag_dir, saved_world_size, same_world)
        return own

    def _load_ema(self, tag_dir: str, saved_world_size: int, same_world: bool) -> None:
        first = torch.load(os.path.join(tag_dir, "rank_00000.pt"), map_location="cpu", weights_only=True)
        if first["ema_layout"] == "partition" and self.sharded and same_world:
            mine = torch.load(os.path.join(tag_dir, f"rank_{self.env.rank:05d}.pt"), map_location="cpu",
                              weights_only=True)["ema"]
            full = None
        elif first["ema_layout"] == "partition":
            shards = [first["ema"]] + [
                torch.load(os.path.join(tag_dir, f"rank_{r:05d}.pt"), map_location="cpu", weights_only=True)["ema"]
                for r in range(1, saved_world_size)
            ]
            full = {n: torch.cat([s[n] for s in shards]) for n in first["ema"]}  # flat, padded; trimmed below
        else:
            full = first["ema"]
        missing = sorted(set(self.ema) - set(full if full is not None else mine))
        if missing:
            raise ValueError(f"checkpoint EMA in {tag_dir} lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, p in self.params.items():
            if full is None:
                value = mine[name]
            else:
                numel = p.ds_numel if self.sharded else p.numel()
                shape = p.ds_shape if self.sharded else p.shape
                whole = full[name].reshape(-1)[:numel].view(shape)
                value = _local_partition(whole, p, self.env) if self.sharded else whole
            self.ema[name].copy_(value.to(self.ema[name].device))


@dataclass
class StepResult:
    loss: float  # mean over ranks; nan when skipped
    metrics: dict[str, float]
    grad_norm: float | None
    skipped: bool  # non-finite loss on some rank: nothing was applied
    applied: bool  # an optimizer step (and EMA update) happened


def _persistent_buffers(module: torch.nn.Module):
    for mod_name, mod in module.named_modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), b


def prune_checkpoints(ckpt_dir: str, keep: int, current: str) -> None:
    """Keep the newest `keep` complete tags (and their universal conversions), `current` always; remove the rest,
    incomplete ones too: a save or a removal that a kill cut short (no other save runs while this one does)."""
    tags = []
    for name in os.listdir(ckpt_dir):
        state = os.path.join(ckpt_dir, name, TRAINER_STATE)
        if os.path.isfile(state):
            tags.append((os.path.getmtime(state), name))
    kept = {name for _, name in sorted(tags)[-keep:]} | {current}
    kept |= {name + UNIVERSAL_SUFFIX for name in kept}
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name not in kept and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


# ---- a frozen model (the GRPO reference) ----------------------------------------------------

# parameters this small stay whole on every rank (DeepSpeed-Chat's reference model uses 1e4): norms, biases,
# gates; gathering them at every use would cost more in latency than they save in memory
PERSISTENCE_THRESHOLD = 10_000


def frozen_engine(module: torch.nn.Module, env: DistEnv, dtype: torch.dtype, offload: bool, flag: str):
    """`module` as a DeepSpeed engine that is never stepped, as DeepSpeed-Chat runs its RLHF reference model:
    ZeRO-3 partitions its parameters (in `dtype`) across the ranks, in pinned CPU memory with `offload` or
    on `env.device` without, and gathers each submodule's parameters onto `env.device` around its own
    forward only. Calling the engine runs `module.forward` there. `flag`: the option that keeps the
    parameters on the device, named when pinned memory runs out."""
    import deepspeed

    # memory_efficient_linear on would replace torch.nn.functional.linear process-wide (the policy's layers
    # too) with DeepSpeed's own autograd function
    zero = {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD, "memory_efficient_linear": False}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": env.world_size,
              "zero_optimization": zero, "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 1 << 30}
    module = module.to(dtype).eval().requires_grad_(False)
    try:
        engine, *_ = deepspeed.initialize(model=module, config=config)
    except RuntimeError as e:
        if offload and "memory" in str(e).lower():
            share = sum(p.numel() * p.element_size() for p in module.parameters()) / env.world_size / 2**30
            raise ValueError(f"cannot allocate {share:.2f} GiB of pinned CPU memory per rank for a frozen model's "
                             f"parameters ({str(e).splitlines()[0]}); keep them on the device with {flag}") from e
        raise
    return engine


@contextlib.contextmanager
def gathered(params):
    """The ZeRO-3 parameters among `params` whole on every rank for the duration (read-only); other
    parameters as they are. For parameters a module uses outside its own forward, which ZeRO-3 does not
    gather: keep the list to those (a module's own small tensors), never a whole model."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params)):
        yield


# ---- resuming -------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """(tag, trainer state) of the newest complete checkpoint of a run directory, or None."""
    latest = os.path.join(run_dir, CHECKPOINTS, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        tag = f.read().strip()
    state_path = os.path.join(run_dir, CHECKPOINTS, tag, TRAINER_STATE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{latest} names tag {tag!r}, but {state_path} is missing")
    with open(state_path) as f:
        return tag, json.load(f)


def prepare_universal(run_dir: str, tag: str, env: DistEnv) -> None:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once, rank 0) for a new world size."""
    from deepspeed.checkpoint import ds_to_universal

    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    out = os.path.join(ckpt_dir, tag + UNIVERSAL_SUFFIX)
    if env.is_main and not os.path.isdir(out):
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = ds_to_universal.argparse.Namespace(
            input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp, num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True,  # ZeRO-1/2 checkpoints lack the universal_checkpoint_info a Megatron client adds
        )
        ds_to_universal.main(args)
        os.replace(tmp, out)
    barrier()


# ---- logging --------------------------------------------------------------------------------


class NullLogger:
    """The logger of ranks other than 0: accepts everything, writes nothing."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image) -> None:
        pass

    def text(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Rank 0's logger: TensorBoard scalars/images against the global step, progress lines on stdout,
    and every scalar row appended to a JSON-lines file (full precision, for scripts and tests)."""

    def __init__(self, log_dir: str, jsonl_path: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)
        os.makedirs(os.path.dirname(jsonl_path) or ".", exist_ok=True)
        self.jsonl = open(jsonl_path, "a")  # noqa: SIM115 - open for the logger's lifetime

    def scalars(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, tag: str, image) -> None:
        self.writer.add_image(tag, image, step)  # (3, H, W) float in [0, 1]

    def text(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


def make_logger(env: DistEnv, log_dir: str, jsonl_path: str) -> NullLogger:
    return TensorBoardLogger(log_dir, jsonl_path) if env.is_main else NullLogger()


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()
