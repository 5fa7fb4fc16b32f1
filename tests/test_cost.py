"""tools/cost.py: FLOPs counted on the meta device equal the real model's, the head's step is its matmuls,
ZeRO memory follows DeepSpeed's estimators, and the CLI prints every section."""

import dataclasses
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import cost  # noqa: E402

from structmar import model as model_module  # noqa: E402
from structmar.model import check_boxes, sample_mask_ratio  # noqa: E402

RATIO = cost.mean_mask_ratio()


def real_model(stage: int, **overrides):
    torch.manual_seed(0)
    return cost.build("tiny", stage, device="cpu", dtype=torch.float32, **overrides)


@pytest.mark.parametrize("stage", [1, 3])
def test_meta_count_equals_real_count(stage):
    meta = cost.count_training(cost.build("tiny", stage, dtype=torch.float32), RATIO)
    real = cost.count_training(real_model(stage), RATIO)
    assert meta.flops == real.flops > 0
    assert meta.saved_bytes == real.saved_bytes > 0
    assert meta.kept_bytes == real.kept_bytes and meta.rebuilt_bytes == real.rebuilt_bytes


def test_frozen_backbone_costs_less_backward():
    full = cost.count_training(cost.build("tiny", 2), RATIO).flops
    frozen = cost.count_training(cost.build("tiny", 1), RATIO).flops
    # no weight gradients for the frozen layers: well under full (3x forward), above the forward alone
    assert full / 3 < frozen < 0.85 * full


def test_derived_checkpointing_flops_equal_real_checkpointing():
    """One pass without checkpointing + the checkpointed blocks' forward = what checkpointing runs."""
    derived = cost.count_training(real_model(2), RATIO).flops_with(True)
    model = real_model(2, grad_checkpointing=True)
    model.diffloss.net.grad_checkpointing = True
    fixed = torch.tensor([RATIO], dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp, FlopCounterMode(display=False) as counter:
        mp.setattr(model_module, "sample_mask_ratio", lambda *a, **k: fixed)
        loss, _ = model(cost.example_batch(model.cfg, 1, "cpu"))
        loss.backward()
    assert counter.get_total_flops() == derived


def test_head_step_is_two_flops_per_weight_per_token():
    model = cost.build("mar_base", 3)
    tokens = 256
    linear = sum(m.weight.numel() for m in model.diffloss.net.modules() if isinstance(m, torch.nn.Linear))
    counted = cost.count_head_step(model, tokens, grad=False).flops
    assert counted == pytest.approx(2 * tokens * linear, rel=1e-3)


def test_backbone_pass_grows_with_known_tokens():
    model = cost.build("tiny", 3)
    few, many = (cost.count_backbone(model, k, grad=False).flops for k in (0, model.cfg.seq_len - 1))
    assert 0 < few < many


def test_mask_ratio_mean_matches_sampler():
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_mask_ratio(0.7, generator=gen) for _ in range(4000)])
    assert float(draws.mean()) == pytest.approx(RATIO, abs=0.005)
    assert cost.mean_known_tokens(256, 1) == 0
    assert 0 < cost.mean_known_tokens(256, 64) < 256


def test_zero3_memory_shrinks_with_world_size_as_deepspeed_says():
    params = cost.Params(backbone=900_000_000, additions=100_000_000, head=0, trainable=1_000_000_000,
                         largest_layer=5_000_000, persistent=0, own=0)
    mem = {w: cost.model_states_bytes(params, 3, w) for w in (1, 8, 64)}
    for w, m in mem.items():
        assert m["deepspeed"] == 4 * params.largest_layer + int(18 * params.trainable / w)
        assert m["ema"] == 4 * params.total / w
    assert mem[1]["deepspeed"] > mem[8]["deepspeed"] > mem[64]["deepspeed"]
    z2 = cost.model_states_bytes(params, 2, 8)
    assert z2["deepspeed"] == 2 * params.trainable + int(18 * params.trainable / 8)
    frozen = dataclasses.replace(params, trainable=100_000_000)
    assert cost.model_states_bytes(frozen, 2, 8)["frozen"] == 2 * 900_000_000


def test_reference_partition_scales_with_world_size_and_leaves_the_gpu_little():
    params = cost.param_counts(cost.build("mar_huge", 3))
    assert 0 < params.persistent < 0.01 * params.total and 0 < params.own < 0.01 * params.total
    for world in (1, 8, 64):
        gpu, host = cost.reference_bytes(params, world, offload=True)
        assert host == 2 * params.total / world
        assert "partition" not in gpu and sum(gpu.values()) < 0.1 * 2 * params.total
        resident, no_host = cost.reference_bytes(params, world, offload=False)
        assert no_host == 0 and resident["partition"] == host
        assert sum(resident.values()) == pytest.approx(sum(gpu.values()) + host)


def test_stage3_time_is_every_flop_on_the_gpu():
    """The reference computes on the policy's GPU: its forward is priced at the GPU's rate, no CPU term."""
    slow = cost.stage_cost("tiny", 3, world=2, gpu_tflops=100.0)
    fast = dataclasses.replace(slow, gpu_tflops=200.0)
    assert slow.flops_per_image["reference forward"] > 0
    flops = slow.step_images * sum(slow.flops_per_image.values())
    assert slow.step_seconds == pytest.approx(flops / (100e12 * slow.mfu))
    assert fast.step_seconds == pytest.approx(slow.step_seconds / 2)
    gathered, h2d = slow.reference_traffic
    assert gathered == slow.ref_gathers * 2 * slow.params.total > 0 and h2d == gathered / 2
    resident = dataclasses.replace(slow, recipe=dataclasses.replace(slow.recipe, ref_offload=False))
    assert resident.reference_traffic == (gathered, 0.0)
    assert resident.memory(2)["reference"] > slow.memory(2)["reference"]


def test_grad_accum_in_training_keeps_memory_and_images_per_epoch():
    one = cost.stage_cost("tiny", 1, world=2)
    four = cost.stage_cost("tiny", 1, world=2, recipe=dataclasses.replace(cost.RECIPE[1], grad_accum=4))
    assert four.memory(2) == one.memory(2)
    assert four.step_seconds == pytest.approx(4 * one.step_seconds)
    assert four.stage_seconds == pytest.approx(one.stage_seconds, rel=1e-3)


def test_check_boxes_skips_value_checks_on_meta_only():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.9]]])  # x1 < x0
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert check_boxes(boxes.to("meta"), mask.to("meta"), 4, False).shape == (1, 1)
    with pytest.raises(ValueError, match="box 0 of sample 0"):
        check_boxes(boxes, mask, 4, False)


@pytest.mark.parametrize("stage", [1, 3])
def test_cli_prints_every_section(stage, capsys):
    cost.main(["--preset", "tiny", "--stage", str(stage), "--world_size", "16"])
    out = capsys.readouterr().out
    for section in ("-- parameters", "-- FLOPs per image", "-- memory per GPU", "ZeRO-1:", "ZeRO-2:", "ZeRO-3:",
                    "-- time at 989 TFLOPS", "steps for"):
        assert section in out
    assert ("reference forward" in out) == (stage == 3) == ("-- the reference" in out)
    cost.main(["--preset", "tiny", "--stage", str(stage), "--activations_gb_per_image", "2.5"])
    assert "2.50 GB per image, given" in capsys.readouterr().out
