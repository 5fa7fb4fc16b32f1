import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from structmar import shapes
from structmar.cli import main
from structmar.shapes import CATEGORIES, CATEGORY_BY_ID, ShapesDetector, generate_shapes


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _load_image(root: Path, split: str, info: dict) -> torch.Tensor:
    array = np.array(Image.open(root / f"{split}2014" / info["file_name"]).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def _ap(root: Path, split: str = "val") -> tuple[float, float]:
    """COCO AP and AP50 of the analytic detector against the ground truth of `split`."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / f"instances_{split}2014.json"))
    detector, results = ShapesDetector(), []
    for info in gt.dataset["images"]:
        det = detector(_load_image(root, split, info)[None])[0]
        for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()):
            x0, y0, x1, y1 = box
            results.append(dict(image_id=info["id"], category_id=label, bbox=[x0, y0, x1 - x0, y1 - y0], score=score))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[0], evaluator.stats[1]


@pytest.fixture(scope="module")
def shapes64(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("s") / "shapes", num_train=8, num_val=80, image_size=64, seed=3)


def test_tree_is_coco_2014(shapes64):
    for split, count in (("train", 8), ("val", 80)):
        with contextlib.redirect_stdout(io.StringIO()):
            inst = COCO(str(shapes64 / "annotations" / f"instances_{split}2014.json"))
            caps = COCO(str(shapes64 / "annotations" / f"captions_{split}2014.json"))
        assert len(inst.getImgIds()) == count == len(caps.getImgIds())
        assert len(inst.getCatIds()) == len(CATEGORIES) >= 8
        for image_id in inst.getImgIds():
            info = inst.loadImgs(image_id)[0]
            assert info["file_name"].startswith(f"COCO_{split}2014_")
            assert Image.open(shapes64 / f"{split}2014" / info["file_name"]).size == (64, 64)
            anns = inst.loadAnns(inst.getAnnIds(imgIds=image_id))
            assert 1 <= len(anns) <= 6
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
                mask = inst.annToMask(ann)  # the RLE segmentation decodes, and its extent is the box
                ys, xs = np.nonzero(mask)
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
                assert mask.sum() == ann["area"]
            texts = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=image_id))]
            assert len(texts) == 3
            for ann in anns:  # every object is named in the listing caption
                assert CATEGORY_BY_ID[ann["category_id"]].name in texts[0]


def test_dataset_varies(shapes64):
    with contextlib.redirect_stdout(io.StringIO()):
        inst = COCO(str(shapes64 / "annotations" / "instances_val2014.json"))
    counts = {len(inst.getAnnIds(imgIds=i)) for i in inst.getImgIds()}
    assert len(counts) >= 4  # 1..6 objects per image
    used = {a["category_id"] for a in inst.dataset["annotations"]}
    assert len(used) >= 10
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in inst.dataset["annotations"]]
    assert max(sides) >= 2 * min(sides)  # varied sizes
    overlapping = 0
    for image_id in inst.getImgIds():
        boxes = [a["bbox"] for a in inst.loadAnns(inst.getAnnIds(imgIds=image_id))]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x0, y0, w0, h0), (x1, y1, w1, h1) = boxes[i], boxes[j]
                overlapping += min(x0 + w0, x1 + w1) > max(x0, x1) and min(y0 + h0, y1 + h1) > max(y0, y1)
    assert overlapping > 0
    corners = [np.array(Image.open(shapes64 / "val2014" / i["file_name"]))[0, 0] for i in inst.dataset["images"]]
    assert np.std(np.array(corners, dtype=float)) > 10  # backgrounds differ from image to image


def test_deterministic_by_seed(tmp_path):
    a = generate_shapes(tmp_path / "a", 6, 4, 48, seed=7, workers=1)
    b = generate_shapes(tmp_path / "b", 6, 4, 48, seed=7, workers=2)
    c = generate_shapes(tmp_path / "c", 6, 4, 48, seed=8, workers=1)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


@pytest.mark.parametrize("size", [32, 64, 160])
def test_detector_ap50(tmp_path, size):
    root = generate_shapes(tmp_path / "d", 0, 64, size, seed=11)
    ap, ap50 = _ap(root)
    assert ap50 >= 0.95, f"AP50 {ap50:.3f} at {size}px"
    assert ap >= 0.85


def test_detector_output_form(shapes64):
    with contextlib.redirect_stdout(io.StringIO()):
        inst = COCO(str(shapes64 / "annotations" / "instances_val2014.json"))
    infos = inst.dataset["images"][:3]
    batch = torch.stack([_load_image(shapes64, "val", i) for i in infos])
    out = ShapesDetector()(batch)
    assert len(out) == 3
    for det in out:
        n = len(det["labels"])
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64 and det["scores"].shape == (n,)
        assert ((det["scores"] > 0) & (det["scores"] <= 1)).all()
        assert set(det["labels"].tolist()) <= set(CATEGORY_BY_ID)
    with pytest.raises(ValueError, match="expects images of shape"):
        ShapesDetector()(batch[0])


def test_detector_finds_nothing_on_background():
    grey = torch.full((2, 3, 64, 64), 0.5)
    grey[1] += 0.02 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert all(len(d["labels"]) == 0 for d in ShapesDetector()(grey))


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="non-negative"):
        generate_shapes(tmp_path / "x", -1, 2, 64)
    with pytest.raises(ValueError, match="image_size 16"):
        generate_shapes(tmp_path / "x", 1, 1, 16)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_shapes(tmp_path / "full", 1, 1, 64)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    (tmp_path / "afile").write_text("")
    with pytest.raises(OSError):
        generate_shapes(tmp_path / "afile" / "sub", 1, 1, 64)

    for argv, needle in [
        (["shapes", "--out", str(tmp_path / "y"), "--num_train", "-3"], "non-negative"),
        (["shapes", "--out", str(tmp_path / "y"), "--image_size", "2000"], "image_size 2000"),
        (["shapes", "--out", str(tmp_path / "full")], "not empty"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_overwrite_replaces_and_failure_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "data"
    generate_shapes(out, 2, 2, 32, seed=0)
    generate_shapes(out, 3, 1, 32, seed=1, overwrite=True)
    assert len(json.loads((out / "annotations" / "instances_train2014.json").read_text())["images"]) == 3

    real = shapes._render_one

    def dies_midway(job):
        if job[2] == 2:  # the third image of the split
            raise RuntimeError("killed")
        return real(job)

    monkeypatch.setattr(shapes, "_render_one", dies_midway)
    with pytest.raises(RuntimeError):
        generate_shapes(tmp_path / "new", 4, 0, 32, workers=1)
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):
        generate_shapes(out, 4, 0, 32, overwrite=True, workers=1)
    assert len(json.loads((out / "annotations" / "instances_train2014.json").read_text())["images"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left behind


def test_console_entry(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "structmar", "shapes", "--out", str(out), "--num_train", "3", "--num_val", "2",
         "--image_size", "32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((out / "train2014").iterdir())) == 3
    done = subprocess.run([sys.executable, "-m", "structmar", "shapes", "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "not empty" in done.stderr and "Traceback" not in done.stderr
