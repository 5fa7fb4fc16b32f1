"""What only a GPU can check: FlexAttention's backward against the SDPA reference, the model's flex training
step against sdpa's, the model in bf16 against fp32, and GRPO with the policy on the GPU and its frozen
reference: a plain copy on the CPU, and the ZeRO-3 engine `structmar rl` builds, offloaded or resident.

Not collected by the CPU suite (`testpaths` is tests/); on a GPU machine:

    python -m pytest gpu_tests          # or tools/gpu_check.sh, which also runs the GPU benchmarks

`STRUCTMAR_TEST_DEVICE=cpu` runs the tests that have no FlexAttention backward on the CPU (a check of the
tests themselves; the flex-backward ones fail there by design, as FlexAttention has no CPU backward).
"""

import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

from bench_attention import synthetic_table  # noqa: E402

from structmar.attention import LayoutBias, flex_attention, sdpa_attention  # noqa: E402
from structmar.config import GRPOConfig, model_config  # noqa: E402
from structmar.grpo import GRPOObjective, ReferencePolicy, colour_reward  # noqa: E402
from structmar.model import StructMAR  # noqa: E402
from tests.test_grpo import TOK, conditions, make_model  # noqa: E402
from tests.test_model import make_batch  # noqa: E402

DEVICE = torch.device(os.environ.get("STRUCTMAR_TEST_DEVICE", "cuda"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("gpu_tests need a CUDA device (STRUCTMAR_TEST_DEVICE=cpu checks the non-flex tests on a CPU)")


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 comparisons in fp32: no TF32 in matmuls or convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _grads(fn, *inputs):
    for t in inputs:
        t.grad = None
    out = fn()
    out.float().pow(2).sum().backward()  # a loss whose gradient depends on every output element
    return out.detach(), [None if t.grad is None else t.grad.detach().clone() for t in inputs]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode,bonus", [("soft", 0.0), ("hard", 0.0), ("soft", 2.5)])
def test_flex_backward_matches_sdpa(mode, bonus, dtype, tol):
    """Output and the gradients of q, k, v and the per-head lambda (a tensor captured by score_mod)."""
    torch.manual_seed(0)
    B, H, D, grid, buffer = 2, 4, 64, 8, 24  # 88 tokens: not a multiple of flex's 128 block
    bias = LayoutBias(synthetic_table(B, grid, buffer, 6, DEVICE), mode=mode, penalise_null=True, bonus=bonus)
    q, k, v = (torch.randn(B, H, buffer + grid * grid, D, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    lam = torch.linspace(0.5, 3.0, H, device=DEVICE, requires_grad=True)
    ref, ref_grads = _grads(lambda: sdpa_attention(q, k, v, bias=bias, lam=lam), q, k, v, lam)
    out, grads = _grads(lambda: flex_attention(q, k, v, bias=bias, lam=lam), q, k, v, lam)
    assert _rel(out, ref) <= tol
    for name, g, r in zip(("q", "k", "v", "lambda"), grads, ref_grads):
        if name == "lambda" and mode == "hard":  # no lambda in a hard mask's scores: no gradient on either path
            assert g is None and r is None
            continue
        assert torch.isfinite(g).all() and _rel(g, r) <= tol, (name, _rel(g, r))


def test_flex_backward_with_padded_keys_matches_sdpa():
    """The cross-attention shape: queries over a padded key set (a key mask), no layout bias."""
    torch.manual_seed(0)
    B, H, D = 3, 4, 64
    q = torch.randn(B, H, 80, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, H, 20, D, device=DEVICE, requires_grad=True) for _ in range(2))
    key_mask = torch.arange(20, device=DEVICE) < torch.tensor([[20], [7], [1]], device=DEVICE)
    ref, ref_grads = _grads(lambda: sdpa_attention(q, k, v, key_mask=key_mask), q, k, v)
    out, grads = _grads(lambda: flex_attention(q, k, v, key_mask=key_mask), q, k, v)
    assert _rel(out, ref) <= 1e-4
    assert all(_rel(g, r) <= 1e-4 for g, r in zip(grads, ref_grads))


def _loss_and_grads(model: StructMAR, batch: dict, seed: int = 5):
    torch.manual_seed(seed)  # the same orders, mask ratio, label drops, timesteps and noise for every model
    loss, _ = model(batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _on_device(batch: dict, dtype=torch.float32) -> dict:
    return {k: (v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)) for k, v in batch.items()}


@pytest.mark.parametrize("layout_bias", ["soft", "hard"])
def test_model_training_step_with_flex_matches_sdpa(layout_bias):
    """A whole training forward and backward (encoder with kept tokens, decoder, head) with attention='flex'
    gives sdpa's loss and gradients, the layout bias's lambda and the cross-attention gates included."""
    cfg = dict(attn_dropout=0.0, proj_dropout=0.0, layout_bias=layout_bias)
    torch.manual_seed(0)
    sdpa = StructMAR(model_config("tiny", attention="sdpa", **cfg)).to(DEVICE).train()
    flex = StructMAR(model_config("tiny", attention="flex", **cfg)).to(DEVICE).train()
    for p in sdpa.diffloss.net.final_layer.parameters():  # a zero-init head passes no gradient back
        torch.nn.init.normal_(p, std=0.02)
    flex.load_state_dict(sdpa.state_dict())
    batch = _on_device(make_batch(sdpa.cfg))
    loss_ref, grads_ref = _loss_and_grads(sdpa, batch)
    loss, grads = _loss_and_grads(flex, batch)
    assert torch.isfinite(loss) and abs(float(loss - loss_ref)) <= 1e-5 * max(1.0, abs(float(loss_ref)))
    assert grads.keys() == grads_ref.keys()
    worst = max(grads, key=lambda n: _rel(grads[n], grads_ref[n]))
    assert _rel(grads[worst], grads_ref[worst]) <= 1e-3, worst
    if layout_bias == "soft":
        assert grads["decoder_blocks.0.attn.bias_lambda"].abs().sum() > 0


def test_bf16_model_follows_fp32():
    """The weights and inputs in bf16 (what a bf16 DeepSpeed engine runs) against fp32: the loss within 3%
    and every weight's gradient pointing the same way (cosine > 0.95), with the attention the backend picks."""
    torch.manual_seed(0)
    model = StructMAR(model_config("tiny", attn_dropout=0.0, proj_dropout=0.0)).to(DEVICE).train()
    for p in model.diffloss.net.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    half = copy.deepcopy(model).to(torch.bfloat16)
    batch = make_batch(model.cfg)
    loss32, grads32 = _loss_and_grads(model, _on_device(batch))
    loss16, grads16 = _loss_and_grads(half, _on_device(batch, torch.bfloat16))
    assert torch.isfinite(loss16) and abs(float(loss16 / loss32) - 1) <= 0.03
    cosine = {n: float(torch.nn.functional.cosine_similarity(grads16[n].flatten(), g.flatten(), dim=0))
              for n, g in grads32.items() if g.abs().sum() > 0}
    worst = min(cosine, key=cosine.get)
    assert cosine[worst] > 0.95, (worst, cosine[worst])


def test_grpo_policy_on_gpu_reference_on_cpu():
    """The policy rolls out and updates on the GPU; the reference stays on the CPU, unchanged, and its means
    arrive on the GPU; the first update reproduces the rollout's log-probabilities (ratio 1)."""
    model = make_model().to(DEVICE)
    reference = ReferencePolicy(model)
    before = copy.deepcopy(reference.model.state_dict())
    settings = GRPOConfig(group_size=3, num_iter=3, temperature=0.9, min_sigma=0.05, kl_coef=0.02)
    objective = GRPOObjective(settings, TOK.to(DEVICE), colour_reward((1.0, 0.0, 0.0), 0.5), reference,
                              generator=torch.Generator().manual_seed(0))
    batch = _on_device(conditions(model.cfg))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss, metrics = objective.loss(model, batch)
    assert metrics["ratio_max_dev"] < 1e-4 and float(metrics["kl"]) < 1e-6
    assert all(m.device.type == DEVICE.type for m in objective.current.ref_means)
    for _ in range(2):
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss, metrics = objective.loss(model, batch)
    assert torch.isfinite(loss) and float(metrics["kl"]) > 0  # the policy moved away from the reference
    assert all(p.device.type == "cpu" for p in reference.model.parameters())
    after = reference.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("offload", [True, False])
def test_grpo_reference_engine_computes_on_the_policys_device(offload):
    """The reference as `structmar rl` builds it (a ZeRO-3 engine, here of one rank): its partitions live in
    CPU memory (offloaded) or on the GPU (resident), and its means, computed on the policy's device, equal
    those of a plain fp32 copy on that device."""
    from structmar import engine as eng
    from structmar.grpo import recompute_means

    env = eng.init_distributed(DEVICE.type)
    model = make_model().to(DEVICE)
    reference = ReferencePolicy(model, env, torch.float32, offload=offload)
    assert {p.ds_tensor.device.type for p in reference.model.parameters()} == {"cpu" if offload else DEVICE.type}
    settings = GRPOConfig(group_size=2, num_iter=3, min_sigma=0.05, rollout_cfg=2.0)
    objective = GRPOObjective(settings, TOK.to(DEVICE), colour_reward((1.0, 0.0, 0.0), 0.5), reference,
                              generator=torch.Generator().manual_seed(0))
    objective.loss(model, _on_device(conditions(model.cfg)))
    ro = objective.current
    with objective._kernels(), torch.no_grad():
        plain = recompute_means(copy.deepcopy(model).float().eval(), ro, None)
    assert all(m.device.type == DEVICE.type for m in ro.ref_means)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(plain, ro.ref_means, strict=True))
