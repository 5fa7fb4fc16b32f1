"""Evaluation metrics: FID and CLIP score of images, layout fidelity with standard errors, and paired differences.

FID uses the field's standard FID Inception (the TF-ported network of pytorch-fid, whose blocks this
module assembles) with weights read from a local file, never downloaded; CLIP score uses a local CLIP
directory holding both towers. Layout fidelity (AP against the input layouts) builds on structmar.reward,
next to the matching it shares with the GRPO reward; this module adds standard errors over images
(bootstrap resamples for AP, which COCOeval pools over all images) and paired differences of two
evaluations of the same layouts.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_HOWTO = (
    "download pt_inception-2015-12-05-6726825d.pth (the FID Inception weights released with pytorch-fid) "
    "once on a machine with internet access and pass its path"
)

# ---- FID ---------------------------------------------------------------------------------------------


class FIDInception(nn.Module):
    """The FID Inception network: images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)
        self.net = net

    @classmethod
    def from_file(cls, path: str, device: str | torch.device = "cpu") -> FIDInception:
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception weights {path} not found: {FID_WEIGHTS_HOWTO}")
        model = cls()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.net.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"{path} is not an FID Inception state dict ({first})") from None
        return model.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D): Gaussian fits compared in closed form.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2). With A, B the centred features scaled by
    1/sqrt(N-1), 1/sqrt(M-1), the non-zero eigenvalues of S_a S_b = A'A B'B are the squared singular
    values of A B', so the trace term is the nuclear norm of the N x M matrix A B': exact, and far
    cheaper than a D x D matrix square root when the sets are smaller than D = 2048. Larger sets
    take the square roots of the eigenvalues of S_a S_b.
    """
    for name, f in (("first", features_a), ("second", features_b)):
        if len(f) < 2:
            raise ValueError(f"FID needs at least 2 images per set; the {name} set has {len(f)}")
    a = torch.as_tensor(np.asarray(features_a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(features_b), dtype=torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    a_c, b_c = (a - mu_a) / (len(a) - 1) ** 0.5, (b - mu_b) / (len(b) - 1) ** 0.5
    trace_a, trace_b = a_c.square().sum(), b_c.square().sum()
    if max(len(a), len(b)) <= a.shape[1]:
        trace_sqrt = torch.linalg.matrix_norm(a_c @ b_c.T, ord="nuc")
    else:
        trace_sqrt = torch.linalg.eigvals((a_c.T @ a_c) @ (b_c.T @ b_c)).sqrt().real.sum()
    fid = (mu_a - mu_b).square().sum() + trace_a + trace_b - 2 * trace_sqrt
    return float(fid.clamp(min=0))


def inception_features(model: FIDInception, images, batch_size: int = 32) -> np.ndarray:
    """Features (N, 2048) of an iterable of (3, H, W) [0, 1] tensors, batched."""
    device = next(model.parameters()).device
    feats, batch = [], []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            feats.append(model(torch.stack(batch).to(device)).cpu())
            batch = []
    if batch:
        feats.append(model(torch.stack(batch).to(device)).cpu())
    return torch.cat(feats).double().numpy()


# ---- CLIP score --------------------------------------------------------------------------------------


class ClipScorer:
    """CLIP score (100 x max(cos(image, caption), 0), averaged) with a local two-tower CLIP directory."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP directory {path} not found")
        needs = f"CLIP score needs a full CLIP model (text and vision towers, image processor) in {path}"
        try:
            model, info = CLIPModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{needs}: {e}") from None
        if info["missing_keys"]:  # transformers would score with randomly initialised towers
            raise ValueError(f"{needs}: {len(info['missing_keys'])} weights are missing, e.g. "
                             f"{sorted(info['missing_keys'])[0]}")
        self.model = model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-image CLIP scores (B,) for images (B, 3, H, W) in [0, 1] and their captions."""
        pixels = self.processor(images=list(images.float().clamp(0, 1).cpu()), return_tensors="pt",
                                do_rescale=False)["pixel_values"].to(self.device)
        text = self.tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        text_emb = F.normalize(_projected(self.model.get_text_features(**text.to(self.device))), dim=-1)
        return (100 * (image_emb * text_emb).sum(-1)).clamp(min=0).cpu()


def _projected(output) -> torch.Tensor:
    """CLIP's projected embedding: a tensor in older transformers, the pooled output of a model output in newer."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---- layout fidelity: standard errors and paired differences ----------------------------------------


def mean_se(values) -> tuple[float, float | None]:
    """Mean and its standard error (None with fewer than two values)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return 0.0, None
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def _ratio_se(numerators, denominators) -> float | None:
    """Standard error of sum(y) / sum(x) over images (linearised; objects within an image are not independent)."""
    y, x = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    n, total = len(x), x.sum()
    if n < 2 or total <= 0:
        return None
    residual = y - y.sum() / total * x
    return float(math.sqrt(n / (n - 1) * np.square(residual).sum()) / total)


def bootstrap_resamples(n: int, count: int) -> list[np.ndarray]:
    """`count` seeded bootstrap draws of n image indices (a rerun reports the same standard errors)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, n, n) for _ in range(count)]


def layout_scores(detections, layouts, image_size: tuple[int, int], categories: dict[int, str],
                  bootstrap: int = 0) -> dict:
    """reward.layout_metrics plus standard errors over images and the mean GRPO-style reward.

    AP is not a mean over images, so its standard errors (`ap_se`, `ap50_se`) come from `bootstrap`
    resamples of the images (seeded, so a rerun reports the same figures); 0 leaves them out.
    """
    from structmar.reward import RewardWeights, coco_ap, layout_rewards, per_image_matches, pooled_metrics

    resamples = bootstrap_resamples(len(layouts), bootstrap)
    ap = coco_ap(detections, layouts, image_size, categories, resamples)  # one pycocotools matching for all rows
    per = per_image_matches(detections, layouts, image_size)
    result = pooled_metrics(per, ap[0])
    if bootstrap:
        result["ap_se"], result["ap50_se"] = (float(v) for v in np.std(ap[1:, :2], axis=0, ddof=1))
    result["success_rate_se"] = _ratio_se(per["successes"], per["objects"])
    result["mean_iou_se"] = _ratio_se(per["iou_sum"], per["matched"])
    result["centroid_distance_se"] = _ratio_se(per["centroid_sum"], per["matched"])
    reward, _ = layout_rewards(detections, layouts, image_size, RewardWeights())
    result["reward"], result["reward_se"] = mean_se(reward.numpy())
    return result


def paired_differences(a: dict, others: list[dict], bootstrap: int = 100, mean: bool = False) -> list[dict]:
    """b minus a for each b of `others`, evaluations (`evaluate.load_evaluation`) of the same layouts as a, with
    standard errors of the paired difference: AP50 from `bootstrap` resamples of the layouts (seeded), the
    success rate and the reward over images. Each layout's own difficulty cancels, so a difference far smaller
    than either figure's own standard error can show: what comparing two GRPO arms, or an arm and its control,
    needs. a's side (its AP50 on every resample, the same resamples for each b) is computed once: one baseline
    against many arms costs half as much.

    `mean` returns one row instead: the mean over `others` of b minus a (several seeds of one arm against
    their common start), with standard errors over the layouts, which count each layout once."""
    from structmar.reward import RewardWeights, coco_ap, layout_rewards, per_image_matches

    targets, size = a["targets"], (a["results"]["image_size"],) * 2
    for b in others:
        same = len(targets) == len(b["targets"]) and all(
            np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(targets, b["targets"]))
        if not same:
            raise ValueError("the two evaluations scored different layouts: compare evaluations of one split and "
                             "count")
        if a["results"]["image_size"] != b["results"]["image_size"]:
            raise ValueError("the two evaluations generated images of different sizes")
    n = len(targets)
    resamples = bootstrap_resamples(n, bootstrap)

    def ap50s(detections) -> np.ndarray:  # on every layout, then on each resample
        return coco_ap(detections, targets, size, a["categories"], resamples)[:, 1]

    def rewards(detections) -> np.ndarray:  # per image
        return layout_rewards(detections, targets, size, RewardWeights())[0].double().numpy()

    base_ap50, base_matches = ap50s(a["detections"]), per_image_matches(a["detections"], targets, size)
    base_rewards = rewards(a["detections"])
    counts = base_matches["objects"]
    rows = [(ap50s(b["detections"]) - base_ap50,
             per_image_matches(b["detections"], targets, size)["successes"] - base_matches["successes"],
             rewards(b["detections"]) - base_rewards) for b in others]
    if mean:
        rows = [tuple(np.mean(column, axis=0) for column in zip(*rows))]
    diffs = []
    for ap50, hits, reward_diff in rows:
        reward, reward_se = mean_se(reward_diff)
        diffs.append(dict(num_layouts=n, ap50=float(ap50[0]),
                          ap50_se=float(np.std(ap50[1:], ddof=1)) if bootstrap > 1 else None,
                          success_rate=float(hits.sum() / counts.sum()), success_rate_se=_ratio_se(hits, counts),
                          reward=reward, reward_se=reward_se))
    return diffs

