"""Detectors behind one interface, layout matching, GRPO rewards and layout-fidelity metrics.

A detector maps images (B, 3, H, W) in [0, 1] to torchvision-style dicts {"boxes" (N, 4) xyxy pixels,
"labels" (N,) dataset category ids, "scores" (N,)}. Three kinds load here: torchvision's Faster R-CNN
ResNet50-FPN v2 from a state-dict file, any transformers object-detection model from a local
directory, and Shapes' analytic detector. Labels are translated into the dataset's category ids by
category name, so one detector serves COCO (identity) and any dataset whose names it knows.

A layout is (boxes (K, 4) normalised xyxy, labels (K,) category ids). Matching is Hungarian within
each category on IoU (ties among non-overlapping candidates broken by centroid distance), so a
right-class object in the wrong place still yields a centroid-distance signal for shaping.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from structmar.config import DETECTOR_KINDS
from structmar.files import check_model_directory, first_line, load_torch_pickle
from structmar.shapes import ShapesDetector

Detections = dict[str, torch.Tensor]


# ---- detectors ------------------------------------------------------------------------------------


def _name_map(detector_names: dict[int, str], categories: dict[int, str]) -> dict[int, int]:
    """Detector label id -> dataset category id, joined on lower-cased category names."""
    by_name = {name.strip().lower(): cid for cid, name in categories.items()}
    return {lid: by_name[n.strip().lower()] for lid, n in detector_names.items() if n.strip().lower() in by_name}


def _translate(det: Detections, label_map: dict[int, int], threshold: float) -> Detections:
    keep = [i for i, (lab, s) in enumerate(zip(det["labels"].tolist(), det["scores"].tolist()))
            if lab in label_map and s >= threshold]
    idx = torch.tensor(keep, dtype=torch.long)
    return dict(
        boxes=det["boxes"].detach().float().cpu()[idx].reshape(-1, 4),
        labels=torch.tensor([label_map[det["labels"][i].item()] for i in keep], dtype=torch.int64),
        scores=det["scores"].detach().float().cpu()[idx],
    )


class TorchvisionFasterRCNN:
    """torchvision fasterrcnn_resnet50_fpn_v2 (COCO's 91-id label space) from a state-dict file."""

    def __init__(self, path: str, categories: dict[int, str], device: str = "cpu", score_threshold: float = 0.05):
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"detector weights {path} not found: save torchvision's fasterrcnn_resnet50_fpn_v2 COCO weights "
                f"(FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1) there with torch.save(model.state_dict(), PATH)"
            )
        state = load_torch_pickle(path, "detector weights")
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # torchvision's reference trainer wraps the weights
        if not isinstance(state, dict):
            raise ValueError(f"detector weights {path} hold a {type(state).__name__}, not a state dict")
        model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} is not a Faster R-CNN ResNet50-FPN v2 (91 classes) state dict: {len(missing)} missing "
                f"keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of the wrong shape "
                f"{wrong[:3]}"
            )
        model.load_state_dict(state)
        self.model = model.eval().to(device)
        self.device = device
        coco_names = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]
        self.label_map = _name_map(dict(enumerate(coco_names)), categories)
        if not self.label_map:
            raise ValueError("Faster R-CNN's COCO label space shares no category name with the dataset")
        self.score_threshold = score_threshold

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[Detections]:
        outputs = self.model(list(images.to(self.device).float().clamp(0, 1)))
        return [_translate(o, self.label_map, self.score_threshold) for o in outputs]


class HFDetector:
    """A transformers object-detection model (DETR, RT-DETR, ...) and its processor from a local directory."""

    def __init__(self, path: str, categories: dict[int, str], device: str = "cpu", score_threshold: float = 0.05):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"detector directory {path} not found: save a transformers object-detection model and its image "
                f"processor there with save_pretrained (e.g. facebook/detr-resnet-50)"
            )
        check_model_directory(path, "detector directory file")
        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            model, info = AutoModelForObjectDetection.from_pretrained(path, local_files_only=True,
                                                                      output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:  # a missing file, or one the checks above do not read
            raise ValueError(f"detector directory {path}: {first_line(e)}") from None
        if info["missing_keys"]:  # transformers would detect with randomly initialised layers
            raise ValueError(f"the detector in {path} lacks {len(info['missing_keys'])} weights, e.g. "
                             f"{sorted(info['missing_keys'])[0]}")
        self.model = model.eval().to(device)
        self.device = device
        self.label_map = _name_map({int(k): v for k, v in self.model.config.id2label.items()}, categories)
        if not self.label_map:
            raise ValueError(f"the detector in {path} shares no category name with the dataset")
        self.score_threshold = score_threshold

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[Detections]:
        images = images.float().clamp(0, 1).cpu()
        inputs = self.processor(images=list(images), return_tensors="pt", do_rescale=False).to(self.device)
        outputs = self.model(**inputs)
        sizes = [tuple(images.shape[-2:])] * len(images)
        results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        return [_translate(r, self.label_map, self.score_threshold) for r in results]


def load_detector(kind: str, path: str | None = None, categories: dict[int, str] | None = None,
                  device: str = "cpu", score_threshold: float = 0.05):
    """The detector named `kind`; `categories` maps the dataset's category ids to names."""
    if kind == "shapes":
        return ShapesDetector()
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"unknown detector {kind!r}; known: {', '.join(DETECTOR_KINDS)}")
    if not path:
        raise ValueError(f"--detector {kind} needs --detector_path")
    if not categories:
        raise ValueError(f"--detector {kind} needs the dataset's categories to map its labels")
    cls = TorchvisionFasterRCNN if kind == "torchvision_frcnn" else HFDetector
    return cls(path, categories, device=device, score_threshold=score_threshold)


# ---- matching ---------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (N, 4), (M, 4) -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


@dataclass
class Match:
    """Per target box: the matched detection (-1 if none), its IoU, score and centroid distance (0..1)."""

    det_index: np.ndarray
    iou: np.ndarray
    score: np.ndarray
    centroid: np.ndarray  # distance between centres / image diagonal; 1 where unmatched


def match_layout(det: Detections, boxes: np.ndarray, labels: np.ndarray, image_size: tuple[int, int]) -> Match:
    """Hungarian matching of target boxes (normalised xyxy) to detections of the same category."""
    h, w = image_size
    targets = np.asarray(boxes, dtype=np.float64) * np.array([w, h, w, h])
    labels = np.asarray(labels)
    det_boxes = det["boxes"].numpy().astype(np.float64).reshape(-1, 4)
    det_labels, det_scores = det["labels"].numpy(), det["scores"].numpy()
    k = len(targets)
    out = Match(np.full(k, -1), np.zeros(k), np.zeros(k), np.ones(k))
    diagonal = float(np.hypot(h, w))
    for cat in np.unique(labels):
        ti = np.nonzero(labels == cat)[0]
        di = np.nonzero(det_labels == cat)[0]
        if len(di) == 0:
            continue
        iou = box_iou(targets[ti], det_boxes[di])
        dist = np.linalg.norm(_centres(targets[ti])[:, None] - _centres(det_boxes[di])[None], axis=-1) / diagonal
        rows, cols = linear_sum_assignment(-iou + 0.01 * dist)
        for r, c in zip(rows, cols):
            t = ti[r]
            out.det_index[t], out.iou[t] = di[c], iou[r, c]
            out.score[t], out.centroid[t] = det_scores[di[c]], dist[r, c]
    return out


# ---- rewards ----------------------------------------------------------------------------------------


@dataclass
class RewardWeights:
    """reward = iou * mean IoU + confidence * mean score - centroid * mean distance - missing * share missing."""

    iou: float = 1.0
    confidence: float = 0.25
    centroid: float = 0.5
    missing: float = 0.5


REWARD_COMPONENTS = ("iou", "confidence", "centroid", "missing")


def layout_rewards(detections: list[Detections], layouts: list[tuple[np.ndarray, np.ndarray]],
                   image_size: tuple[int, int], weights: RewardWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-image rewards (B,) and each component (B,), averaged over the image's target boxes."""
    reward, comp, _ = layout_box_rewards(detections, layouts, image_size, weights)
    return reward, comp


def layout_box_rewards(detections: list[Detections], layouts: list[tuple[np.ndarray, np.ndarray]],
                       image_size: tuple[int, int], weights: RewardWeights):
    """`layout_rewards` plus each target box's own reward: (rewards (B,), components, [per box (K_i,)]).

    A box's reward is the weighted sum of its own IoU, score, centroid distance and missing flag; an
    image's reward is the mean over its boxes (what credit assignment per box splits up again)."""
    if len(detections) != len(layouts):
        raise ValueError(f"{len(detections)} detection sets for {len(layouts)} layouts")
    parts = {name: [] for name in REWARD_COMPONENTS}
    per_box = []
    for i, (det, (boxes, labels)) in enumerate(zip(detections, layouts)):
        if len(boxes) == 0:
            raise ValueError(f"layout {i} has no boxes: a layout reward needs at least one")
        m = match_layout(det, boxes, labels, image_size)
        missing = (m.det_index < 0).astype(np.float64)
        parts["iou"].append(m.iou.mean())
        parts["confidence"].append(m.score.mean())
        parts["centroid"].append(m.centroid.mean())
        parts["missing"].append(missing.mean())
        per_box.append(torch.tensor(weights.iou * m.iou + weights.confidence * m.score
                                    - weights.centroid * m.centroid - weights.missing * missing, dtype=torch.float32))
    comp = {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()}
    reward = (weights.iou * comp["iou"] + weights.confidence * comp["confidence"]
              - weights.centroid * comp["centroid"] - weights.missing * comp["missing"])
    return reward, comp, per_box


# ---- layout-fidelity metrics (evaluation) ---------------------------------------------------------


def per_image_matches(detections: list[Detections], layouts: list[tuple[np.ndarray, np.ndarray]],
                      image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per image, from its Hungarian match to its layout: objects, successes (IoU >= 0.5), matched objects,
    and the sums of IoU and centroid distance over the matched ones: what the layout metrics pool, and what
    their standard errors over images need."""
    rows = []
    for det, (boxes, labels) in zip(detections, layouts):
        m = match_layout(det, boxes, labels, image_size)
        hit = m.det_index >= 0
        rows.append((len(boxes), (m.iou >= 0.5).sum(), hit.sum(), m.iou[hit].sum(), m.centroid[hit].sum()))
    columns = np.array(rows, dtype=np.float64).reshape(-1, 5).T
    return dict(zip(("objects", "successes", "matched", "iou_sum", "centroid_sum"), columns))


def pooled_metrics(matches: dict[str, np.ndarray], ap_row: np.ndarray) -> dict[str, float]:
    """layout_metrics' figures from `per_image_matches` and one row of `coco_ap`, for callers that keep both."""
    objects, matched = int(matches["objects"].sum()), float(matches["matched"].sum())
    ap, ap50, ap75 = (float(v) for v in ap_row[:3])
    return dict(num_images=len(matches["objects"]), num_objects=objects,
                success_rate=float(matches["successes"].sum()) / max(objects, 1),
                mean_iou=float(matches["iou_sum"].sum()) / matched if matched else 0.0,
                centroid_distance=float(matches["centroid_sum"].sum()) / matched if matched else 1.0,
                ap=ap, ap50=ap50, ap75=ap75)


def layout_metrics(detections: list[Detections], layouts: list[tuple[np.ndarray, np.ndarray]],
                   image_size: tuple[int, int], categories: dict[int, str]) -> dict[str, float]:
    """COCO AP/AP50/AP75 of the detections against the input layouts, plus matched-box statistics.

    This is the "YOLO score" protocol: the layouts are the ground truth, the detector's output the
    predictions, scored by pycocotools. Also: mean IoU of matched boxes, mean centroid distance
    (fraction of the image diagonal, matched boxes), and the share of target objects whose
    same-category detection has IoU >= 0.5 (success rate).
    """
    return pooled_metrics(per_image_matches(detections, layouts, image_size),
                          coco_ap(detections, layouts, image_size, categories)[0])


def coco_ap(detections: list[Detections], layouts: list[tuple[np.ndarray, np.ndarray]], image_size: tuple[int, int],
            categories: dict[int, str], resamples: list[np.ndarray] = ()) -> np.ndarray:
    """COCO AP, AP50 and AP75 (pycocotools) of the detections against the layouts: row 0 on all images, then
    one row per resample (an index array into the images, repeats allowed, as a bootstrap draws): (1 + R, 3).

    pycocotools matches detections to boxes image by image (`evaluate`, nearly all of the cost), then pools the
    matches into precision/recall (`accumulate`). A resample pools the per-image matches of its images, which
    is exactly what scoring the resampled images afresh gives (an image's matches depend on that image alone),
    so a bootstrap of R resamples costs one matching and R + 1 poolings. A set without boxes or detections
    scores 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    h, w = image_size
    images, gts, dts = [], [], []
    for i, (det, (boxes, labels)) in enumerate(zip(detections, layouts)):
        images.append(dict(id=i + 1, width=w, height=h))
        for box, lab in zip(np.asarray(boxes) * np.array([w, h, w, h]), np.asarray(labels)):
            x0, y0, x1, y1 = box.tolist()
            gts.append(dict(id=len(gts) + 1, image_id=i + 1, category_id=int(lab), bbox=[x0, y0, x1 - x0, y1 - y0],
                            area=(x1 - x0) * (y1 - y0), iscrowd=0))
        for box, lab, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
            x0, y0, x1, y1 = box
            dts.append(dict(image_id=i + 1, category_id=int(lab), bbox=[x0, y0, x1 - x0, y1 - y0], score=score))
    rows = np.zeros((1 + len(resamples), 3))
    if not gts or not dts:
        return rows
    gt = COCO()
    gt.dataset = dict(images=images, annotations=gts, categories=[dict(id=c, name=n) for c, n in categories.items()])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(dts), "bbox")
        evaluator.evaluate()
        # evalImgs is ordered category-major, then area range, then image (pycocotools' layout)
        per_image = np.array(evaluator.evalImgs, dtype=object).reshape(-1, len(images))
        ids = np.asarray(evaluator.params.imgIds)
        for r, idx in enumerate([np.arange(len(images)), *resamples]):
            idx = np.asarray(idx)
            evaluator.evalImgs = per_image[:, idx].reshape(-1).tolist()
            evaluator.params.imgIds = evaluator._paramsEval.imgIds = ids[idx].tolist()
            evaluator.accumulate()
            evaluator.summarize()
            rows[r] = evaluator.stats[:3]
    return np.maximum(rows, 0.0)  # -1 (no box of any category in a resample) scores 0, as an empty set does
