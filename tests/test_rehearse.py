"""tools/rehearse.py's COCO tree: structmar.coco reads it with COCO's 80 category ids (and gaps), 5 captions per
image, non-square images, and crowd regions in RLE left out of the layouts."""

import json
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import rehearse  # noqa: E402

from structmar.coco import CocoLayouts  # noqa: E402

COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids 1-90 COCO leaves unused


def test_coco_tree_reads_as_coco(tmp_path):
    from pycocotools import mask as mask_utils

    rehearse.write_coco(str(tmp_path), {"train2014": 4})
    layouts = CocoLayouts(str(tmp_path), "train2014", image_size=256)
    assert len(layouts) == 4 and layouts.dropped == {"no_boxes": 0, "no_captions": 0}
    assert len(layouts.categories) == 80 and max(layouts.categories) == 90
    assert set(range(1, 91)) - set(layouts.categories) == COCO_GAPS
    assert layouts.categories[1] == "person" and layouts.categories[90] == "toothbrush"
    with open(tmp_path / "annotations" / "instances_train2014.json") as f:
        anns = json.load(f)["annotations"]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd  # the first image has one
    for layout in layouts:
        assert len(layout.captions) == 5
        width, height = Image.open(tmp_path / "train2014" / layout.file_name).size
        assert (width, height) == layout.orig_size and width != height
        plain = [a for a in anns if a["image_id"] == layout.image_id and not a["iscrowd"]]
        assert len(layout.boxes) == len(plain)  # crowd regions are not layout boxes
    for a in crowd:
        rle = mask_utils.frPyObjects(a["segmentation"], *a["segmentation"]["size"])
        x, y, w, h = (round(v) for v in a["bbox"])
        assert mask_utils.area(rle) == w * h
        decoded = mask_utils.decode(rle)
        assert decoded[y:y + h, x:x + w].all() and decoded.sum() == w * h


def test_checkpointed_blocks_recompute_with_the_forwards_attention_kernels():
    """Found by the rehearsal (stage 3 at mar_base): GRPO runs its forward under SDPA's math kernel and the
    backward outside it; a checkpointed block recomputed with the default (fused) kernels saved other tensors and
    torch.utils.checkpoint refused the backward. The recomputation now runs under the forward's kernels."""
    import torch
    from test_model import make_batch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from structmar.config import model_config
    from structmar.model import StructMAR, mask_by_order, patchify, sample_orders

    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = StructMAR(model_config("tiny", grad_checkpointing=ckpt)).eval()
        batch = make_batch(model.cfg)
        mask = mask_by_order(40, sample_orders(3, model.cfg.seq_len, generator=torch.Generator().manual_seed(0)))
        with sdpa_kernel(SDPBackend.MATH):
            z = model.predict(patchify(batch["latents"]), mask, model.condition(batch))
        z.square().mean().backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-7, msg=n)
