import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from structmar.reward import (
    RewardWeights,
    coco_ap,
    layout_box_rewards,
    layout_metrics,
    layout_rewards,
    load_detector,
    match_layout,
)
from structmar.shapes import CATEGORY_BY_ID, generate_shapes

SIZE = (100, 200)  # (height, width): non-square so x/y mix-ups show


def shapes_categories() -> dict[int, str]:
    return {cid: c.name for cid, c in CATEGORY_BY_ID.items()}


def _det(boxes_px, labels, scores=None):
    boxes = torch.tensor(boxes_px, dtype=torch.float32).reshape(-1, 4)
    scores = torch.ones(len(labels)) if scores is None else torch.tensor(scores, dtype=torch.float32)
    return dict(boxes=boxes, labels=torch.tensor(labels, dtype=torch.int64), scores=scores)


def _to_px(boxes):
    h, w = SIZE
    return (np.asarray(boxes) * np.array([w, h, w, h])).tolist()


LAYOUT = (np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.6, 0.3, 0.9]]), np.array([1, 1, 2]))
CATS = {1: "red circle", 2: "blue square"}


def test_perfect_detections_score_one():
    det = _det(_to_px(LAYOUT[0]), LAYOUT[1].tolist())
    m = layout_metrics([det, det], [LAYOUT, LAYOUT], SIZE, CATS)
    assert m["ap"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0) and m["ap75"] == pytest.approx(1.0)
    assert m["success_rate"] == 1.0 and m["mean_iou"] == pytest.approx(1.0) and m["centroid_distance"] == 0.0


def test_known_shift_gives_known_iou():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5]])
    shifted = boxes + np.array([0.25, 0.0, 0.25, 0.0])  # half the box width: IoU = 0.125 / 0.375
    m = match_layout(_det(_to_px(shifted), [1]), boxes, np.array([1]), SIZE)
    assert m.iou[0] == pytest.approx(1 / 3)
    assert m.centroid[0] == pytest.approx(0.25 * 200 / np.hypot(100, 200))
    metrics = layout_metrics([_det(_to_px(shifted), [1])], [(boxes, np.array([1]))], SIZE, CATS)
    assert metrics["success_rate"] == 0.0 and metrics["ap50"] == 0.0 and metrics["mean_iou"] == pytest.approx(1 / 3)


def test_hungarian_matches_within_category():
    boxes, labels = LAYOUT
    # detections listed in another order, plus a right-place detection of the wrong class
    det = _det([_to_px(boxes)[1], _to_px(boxes)[0], _to_px(boxes)[2]], [1, 1, 1])
    m = match_layout(det, boxes, labels, SIZE)
    assert m.det_index.tolist() == [1, 0, -1]
    assert m.iou.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert m.centroid[2] == 1.0


def test_rewards_order_and_components():
    boxes, labels = LAYOUT
    perfect = _det(_to_px(boxes), labels.tolist(), [0.9, 0.9, 0.9])
    shifted = _det(_to_px(boxes + 0.05), labels.tolist(), [0.9, 0.9, 0.9])
    partial = _det(_to_px(boxes[:1]), [1], [0.9])
    empty = _det([], [])
    reward, comp = layout_rewards([perfect, shifted, partial, empty], [LAYOUT] * 4, SIZE, RewardWeights())
    assert reward[0] > reward[1] > reward[2] > reward[3]
    assert comp["missing"].tolist() == pytest.approx([0, 0, 2 / 3, 1])
    assert comp["iou"][0] == pytest.approx(1.0) and comp["confidence"][0] == pytest.approx(0.9)
    only_iou, _ = layout_rewards([shifted], [LAYOUT], SIZE, RewardWeights(iou=1, confidence=0, centroid=0, missing=0))
    assert only_iou[0] == pytest.approx(comp["iou"][1].item())
    with pytest.raises(ValueError, match="layout 0 has no boxes"):
        layout_rewards([empty], [(np.zeros((0, 4)), np.zeros(0))], SIZE, RewardWeights())
    # each box's own reward: the image's is their mean; a missing box pays the missing weight alone
    same, same_comp, per_box = layout_box_rewards([perfect, shifted, partial, empty], [LAYOUT] * 4, SIZE,
                                                  RewardWeights())
    assert torch.equal(same, reward) and all(torch.equal(same_comp[k], comp[k]) for k in comp)
    assert torch.allclose(torch.stack([b.mean() for b in per_box]), reward)
    assert per_box[2][0] == pytest.approx(1.0 + 0.25 * 0.9) and per_box[2][1:].tolist() == pytest.approx([-1.0, -1.0])


def test_bootstrap_ap_equals_scoring_each_resample_afresh():
    """coco_ap pools one matching per image over each resample: the same AP as scoring the resampled images anew
    (repeats included), on noisy detections of three categories with misses, duplicates and spurious boxes."""
    rng = np.random.default_rng(3)
    cats = {1: "red circle", 2: "blue square", 3: "green triangle"}
    detections, layouts = [], []
    for i in range(40):
        k = 0 if i % 13 == 0 else int(rng.integers(1, 5))  # images 0, 13, 26, 39 have no boxes
        corner = rng.uniform(0, 0.6, (k, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(0.1, 0.4, (k, 2))], 1)
        labels = rng.integers(1, 4, k)
        keep = rng.random(k) < 0.8
        jitter = rng.normal(0, 0.02, (k, 4))
        dboxes = np.concatenate([(boxes + jitter)[keep], rng.uniform(0, 0.5, (2, 4)) + [0, 0, 0.5, 0.5]])
        dlabels = np.concatenate([np.where(rng.random(k) < 0.9, labels, rng.integers(1, 4, k))[keep],
                                  rng.integers(1, 4, 2)])
        detections.append(_det(_to_px(dboxes), dlabels.tolist(), rng.random(len(dlabels)).tolist()))
        layouts.append((boxes, labels))
    resamples = [rng.integers(0, 40, 40) for _ in range(6)] + [np.array([0, 13, 26])]  # the last: no boxes at all
    rows = coco_ap(detections, layouts, SIZE, cats, resamples)
    assert rows.shape == (8, 3)
    for row, idx in zip(rows, [np.arange(40), *resamples]):
        m = layout_metrics([detections[i] for i in idx], [layouts[i] for i in idx], SIZE, cats)
        assert row.tolist() == pytest.approx([m["ap"], m["ap50"], m["ap75"]], abs=1e-12)
    assert 0.2 < rows[0, 1] < 0.95 and len(set(rows[1:7, 1].round(6))) > 3  # a real spread, not a constant
    assert rows[-1].tolist() == [0.0, 0.0, 0.0]


def test_shapes_detector_scores_real_layouts(tmp_path):
    root = generate_shapes(tmp_path / "s", 0, 24, 64, seed=5)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_val2014.json"))
    detector = load_detector("shapes")
    images, layouts = [], []
    for info in coco.dataset["images"]:
        array = np.array(Image.open(root / "val2014" / info["file_name"]).convert("RGB"))
        images.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        boxes = np.array([[x / 64, y / 64, (x + w) / 64, (y + h) / 64] for x, y, w, h in (a["bbox"] for a in anns)])
        layouts.append((boxes, np.array([a["category_id"] for a in anns])))
    dets = detector(torch.stack(images))
    m = layout_metrics(dets, layouts, (64, 64), shapes_categories())
    assert m["ap50"] >= 0.95 and m["success_rate"] >= 0.95
    mismatched = layout_metrics(dets, layouts[1:] + layouts[:1], (64, 64), shapes_categories())
    assert mismatched["ap50"] < 0.3  # the metric is not fooled by another image's layout
    reward, _ = layout_rewards(dets, layouts, (64, 64), RewardWeights())
    shuffled, _ = layout_rewards(dets, layouts[1:] + layouts[:1], (64, 64), RewardWeights())
    assert reward.mean() > shuffled.mean() + 0.5


def test_faster_rcnn_from_state_dict_file(tmp_path):
    from torchvision.models import resnet18
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    path = tmp_path / "frcnn.pth"
    torch.manual_seed(0)
    torch.save(fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91).state_dict(), path)
    coco_cats = {1: "person", 3: "car", 18: "dog"}
    detector = load_detector("torchvision_frcnn", str(path), coco_cats, score_threshold=0.0)
    detector.model.transform.min_size, detector.model.transform.max_size = (64,), 64  # keep the CPU test fast
    out = detector(torch.rand(1, 3, 64, 64))
    assert set(out[0]["labels"].tolist()) <= set(coco_cats)
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) == len(out[0]["scores"])
    assert detector.label_map == {1: 1, 3: 3, 18: 18}  # COCO ids map onto themselves by name

    with pytest.raises(ValueError, match="shares no category name"):
        load_detector("torchvision_frcnn", str(path), shapes_categories())
    wrong = tmp_path / "resnet.pth"
    torch.save(resnet18().state_dict(), wrong)
    with pytest.raises(ValueError, match="is not a Faster R-CNN ResNet50-FPN v2"):
        load_detector("torchvision_frcnn", str(wrong), coco_cats)
    with pytest.raises(FileNotFoundError, match="missing.pth not found"):
        load_detector("torchvision_frcnn", str(tmp_path / "missing.pth"), coco_cats)
    with pytest.raises(ValueError, match="needs --detector_path"):
        load_detector("torchvision_frcnn", None, coco_cats)


def test_hf_detector_from_local_directory(tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage4"])
    names = {0: "red circle", 1: "blue square", 2: "zebra"}
    config = DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12, id2label=names,
                        label2id={v: k for k, v in names.items()})
    DetrForObjectDetection(config).save_pretrained(tmp_path / "detr")
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(tmp_path / "detr")
    detector = load_detector("hf", str(tmp_path / "detr"), shapes_categories(), score_threshold=0.0)
    out = detector(torch.rand(2, 3, 64, 64))
    assert len(out) == 2
    by_name = {v: k for k, v in shapes_categories().items()}
    assert detector.label_map == {0: by_name["red circle"], 1: by_name["blue square"]}  # zebra has no category
    for det in out:
        assert set(det["labels"].tolist()) <= {by_name["red circle"], by_name["blue square"]}
        assert det["boxes"].shape == (len(det["labels"]), 4) and len(det["labels"]) <= 12
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        load_detector("hf", str(tmp_path / "nowhere"), shapes_categories())
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        load_detector("yolo", "x", shapes_categories())
