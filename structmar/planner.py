"""The layout planner: a caption in, a layout out (boxes with categories), so a caption alone makes an image.

A DETR-style set predictor. Learned queries pass through a small pre-norm transformer decoder that
cross-attends to the caption's CLIP token states (and its pooled vector as one more key); each query's output
gives a class over the categories plus "no object" and a sigmoid (cx, cy, w, h) box. Training matches
predictions to the ground-truth boxes one to one (the Hungarian method on -p(class) + L1 + generalised IoU)
and minimises cross-entropy (no-object weighted 0.1) + L1 + generalised IoU, after every decoder layer (DETR's
auxiliary losses). `structmar train-planner` trains it through the loop of every stage (`structmar.train`);
`structmar sample --planner` and `structmar eval --planner` plan from captions.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from structmar.config import PlannerConfig, PlannerTrainConfig
from structmar.train import Summary, SupervisedObjective, train

# ---- the model ----------------------------------------------------------------------------------


class Planner(nn.Module):
    """Caption states -> per decoder layer, class logits (B, Q, C + 1) and boxes (B, Q, 4) cxcywh in [0, 1]."""

    def __init__(self, cfg: PlannerConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.text_input in ("tokens", "both"):
            self.token_proj = nn.Linear(cfg.text_dim, w)
        if cfg.text_input in ("pooled", "both"):
            self.pooled_proj = nn.Linear(cfg.text_dim, w)
        self.queries = nn.Parameter(torch.empty(cfg.num_queries, w))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, cfg.num_heads, 4 * w, cfg.dropout, batch_first=True, norm_first=True)
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)  # shared by every layer's output (pre-norm layers leave it unnormalised)
        self.class_head = nn.Linear(w, len(cfg.categories) + 1)
        self.box_head = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 4))
        # category id -> class index (-1: not a category of this planner)
        ids = [int(c[0]) for c in cfg.categories]
        lookup = torch.full((max(ids) + 2,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("class_of_id", lookup, persistent=False)
        self.register_buffer("id_of_class", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        nn.init.normal_(self.queries, std=1.0)  # distinct queries: identical ones would get identical outputs
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def memory(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The keys the queries attend to (B, M, W) and their padding mask (True = ignore) or None."""
        parts, pads = [], []
        if self.cfg.text_input in ("pooled", "both"):
            pooled = batch["text_pooled"]
            parts.append(self.pooled_proj(pooled)[:, None])
            pads.append(torch.zeros(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device))
        if self.cfg.text_input in ("tokens", "both"):
            parts.append(self.token_proj(batch["text_tokens"]))
            pads.append(~batch["text_mask"])
        padding = torch.cat(pads, 1)
        return torch.cat(parts, 1), padding if padding.any() else None

    def predict(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits (B, Q, C + 1), boxes (B, Q, 4) cxcywh) after each decoder layer, the last one last."""
        memory, padding = self.memory(batch)
        x = self.queries.to(memory.dtype)[None].expand(memory.shape[0], -1, -1)
        outputs = []
        for layer in self.layers:
            x = layer(x, memory, memory_key_padding_mask=padding)
            h = self.norm(x)
            outputs.append((self.class_head(h), self.box_head(h).sigmoid()))
        return outputs

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The set loss of the last layer (plus every earlier layer's with `aux_loss`) and its parts."""
        targets = self.targets(batch)
        outputs = self.predict(batch)
        layers = outputs if self.cfg.aux_loss else outputs[-1:]
        losses = [set_loss(logits, boxes, targets, self.cfg) for logits, boxes in layers]
        total = sum(loss for loss, _ in losses)
        return total, losses[-1][1]

    def targets(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per caption: the ground truth's class indices (N,) and boxes (N, 4) cxcywh."""
        classes = self.class_of_id[batch["category_ids"].clamp(min=0).clamp(max=len(self.class_of_id) - 1)]
        keep = batch["box_mask"] & (classes >= 0)
        boxes = box_convert(batch["boxes"].float(), "xyxy", "cxcywh")
        return [(classes[i][keep[i]], boxes[i][keep[i]]) for i in range(len(keep))]


# ---- matching and loss ----------------------------------------------------------------------------


def match(logits: torch.Tensor, boxes: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
          cfg: PlannerConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per caption, the one-to-one assignment of its Q predictions (logits (B, Q, C + 1), boxes (B, Q, 4)) to its
    N ground-truth boxes minimising DETR's cost -class_weight p(class) + l1_weight L1 - giou_weight GIoU:
    (prediction indices, target indices). The costs of the whole batch are computed at once (one op each, not
    one per caption), then split per caption for the Hungarian method."""
    sizes = [len(classes) for classes, _ in targets]
    empty = torch.zeros(0, dtype=torch.long, device=logits.device)
    if sum(sizes) == 0:
        return [(empty, empty)] * len(targets)
    with torch.no_grad():
        classes = torch.cat([c for c, _ in targets])
        target_boxes = torch.cat([b for _, b in targets]).float()
        flat_boxes = boxes.flatten(0, 1).float()
        cost = -cfg.class_weight * logits.flatten(0, 1).float().softmax(-1)[:, classes]  # (B * Q, T)
        cost = cost + cfg.l1_weight * torch.cdist(flat_boxes, target_boxes, p=1)
        if cfg.giou_weight:
            cost = cost - cfg.giou_weight * generalized_box_iou(box_convert(flat_boxes, "cxcywh", "xyxy"),
                                                                box_convert(target_boxes, "cxcywh", "xyxy"))
        cost = cost.view(*boxes.shape[:2], -1).cpu().numpy()
    matches = []
    for i, block in enumerate(np.split(cost, np.cumsum(sizes)[:-1], axis=-1)):
        rows, cols = linear_sum_assignment(block[i])
        matches.append((torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                        torch.as_tensor(cols, dtype=torch.long, device=logits.device)))
    return matches


def set_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
             cfg: PlannerConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DETR's loss of one layer's predictions (B, Q, C + 1), (B, Q, 4) against the per-caption targets: weighted
    cross-entropy over every query (unmatched ones: no object) + L1 + (1 - GIoU) over the matched boxes, the box
    terms averaged over the ground-truth boxes."""
    num_classes = logits.shape[-1] - 1
    matches = match(logits, boxes, targets, cfg)
    batch_index = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)])
    query_index = torch.cat([rows for rows, _ in matches])
    target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
    target_classes[batch_index, query_index] = torch.cat([t[0][cols] for t, (_, cols) in zip(targets, matches)])
    weight = torch.ones(num_classes + 1, device=logits.device)
    weight[num_classes] = cfg.no_object_weight
    ce = F.cross_entropy(logits.float().flatten(0, 1), target_classes.flatten(), weight=weight)
    num_boxes = max(len(query_index), 1)
    pred = boxes[batch_index, query_index].float()  # (T, 4)
    true = torch.cat([t[1][cols] for t, (_, cols) in zip(targets, matches)]).float()
    l1 = (pred - true).abs().sum() / num_boxes
    giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(true, "cxcywh", "xyxy")))
    giou_loss = (1 - giou).sum() / num_boxes
    loss = cfg.class_weight * ce + cfg.l1_weight * l1 + cfg.giou_weight * giou_loss
    return loss, {"loss_ce": ce.detach(), "loss_l1": l1.detach(), "loss_giou": giou_loss.detach()}


# ---- training ----------------------------------------------------------------------------------


class PlannerObjective(SupervisedObjective):
    """`structmar train-planner`: the planner's own set loss; every parameter trains."""

    def __init__(self):
        self.name = "planner"

    def trainable(self, param_name: str) -> bool:
        return True


def run_train_planner(cfg: PlannerTrainConfig) -> Summary:
    """`structmar train-planner`: the stage loop with the planner as its model."""
    return train(cfg, PlannerObjective(), build_model=Planner)


# ---- loading and planning --------------------------------------------------------------------------


def load_planner(path: str, device: str | torch.device = "cpu") -> Planner:
    """The planner in `path` (its export, or the run directory holding it), with its EMA weights."""
    from structmar.files import load_safetensors
    from structmar.model import load_weights, weights_file

    path = weights_file(path, "--planner")
    tensors, meta = load_safetensors(path, "--planner")  # a damaged file is one line naming it
    if meta.get("stage") != "planner":
        raise ValueError(f"--planner {path} is not a planner export (its stage is {meta.get('stage', 'unknown')}; "
                         "train one with structmar train-planner)")
    model = Planner(PlannerConfig.from_dict(json.loads(meta["config"])))
    ema = {k[len("model_ema."):]: v for k, v in tensors.items() if k.startswith("model_ema.")}
    report = load_weights(model, ema)
    if report.missing:
        raise ValueError(f"{path} lacks {len(report.missing)} of the planner's weights, e.g. {report.missing[0]}")
    model.export_path = path
    return model.eval().requires_grad_(False).to(device)


def check_categories(planner: Planner, categories: dict[int, str] | None, other: str) -> None:
    """A one-line error naming the difference when the planner's categories are not `categories` (those of
    `other`: the image model, or the data); nothing to check when `other` records none."""
    if categories is None:
        return
    mine = {int(i): name for i, name in planner.cfg.categories}
    only_planner = [f"{i} {mine[i]!r}" for i in sorted(set(mine) - set(categories))]
    only_other = [f"{i} {categories[i]!r}" for i in sorted(set(categories) - set(mine))]
    renamed = [f"{i} is {mine[i]!r} vs {categories[i]!r}" for i in sorted(set(mine) & set(categories))
               if mine[i] != categories[i]]
    problems = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for label, items in
                (("only the planner has", only_planner), (f"only {other} has", only_other), ("id", renamed)) if items]
    if problems:
        raise ValueError(f"--planner {planner.export_path}: its categories differ from {other}'s: "
                         + "; ".join(problems))


def truncation_notices(text_encoder, captions: list[str]) -> list[str]:
    """A notice for each caption longer than the text encoder takes (it keeps the first max_length tokens)."""
    notices = []
    for i, caption in enumerate(captions):
        n = len(text_encoder.tokenizer(caption)["input_ids"])
        if n > text_encoder.max_length:
            notices.append(f"caption {i} has {n} tokens; the text encoder takes {text_encoder.max_length}: "
                           f"truncated to its first {text_encoder.max_length} ({caption[:40]!r}...)")
    return notices


@dataclass
class Plan:
    """A planned layout: boxes (K, 4) normalised xyxy, their category ids, names and scores, best first."""

    boxes: np.ndarray
    category_ids: np.ndarray
    tags: list[str]
    scores: np.ndarray


@torch.no_grad()
def plan_captions(planner: Planner, text_encoder, captions: list[str], max_boxes: int | None = None,
                  notify: bool = True) -> list[Plan]:
    """A layout per caption: the queries whose most probable class is a category (not "no object"), best first,
    at most `max_boxes`; a caption whose every query says "no object" keeps its single best box."""
    if notify:
        for line in truncation_notices(text_encoder, captions):
            print(f"structmar: notice: {line}", file=sys.stderr)
    tokens, mask, pooled = text_encoder.encode(captions)
    device = next(planner.parameters()).device
    logits, boxes = planner.predict(dict(text_tokens=tokens.to(device), text_mask=mask.to(device),
                                         text_pooled=pooled.to(device)))[-1]
    prob = logits.float().softmax(-1)
    scores, classes = prob[..., :-1].max(-1)  # (B, Q)
    is_object = prob.argmax(-1) < prob.shape[-1] - 1
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy").clamp(0, 1)
    names = [name for _, name in planner.cfg.categories]
    plans = []
    for i in range(len(captions)):
        keep = torch.nonzero(is_object[i]).flatten()
        if len(keep) == 0:
            keep = scores[i].argmax()[None]
        keep = keep[scores[i][keep].argsort(descending=True)][:max_boxes]
        b = xyxy[i, keep].cpu().numpy()
        # a box clamped to the border may lose its extent: keep it at least a thousandth wide and high
        b[:, 2:] = np.maximum(b[:, 2:], np.minimum(b[:, :2] + 1e-3, 1.0))
        b[:, :2] = np.minimum(b[:, :2], b[:, 2:] - 1e-3)
        cls = classes[i, keep].cpu()
        plans.append(Plan(b.astype(np.float32), planner.id_of_class[cls.to(planner.id_of_class.device)].cpu().numpy(),
                          [names[c] for c in cls.tolist()], scores[i, keep].cpu().numpy()))
    return plans


def layout_spec_json(caption: str, plan: Plan) -> dict:
    """A planned layout as a layout spec (`structmar sample --layout` reads it back)."""
    boxes = [{"box": [round(float(v), 5) for v in box], "tag": tag} for box, tag in zip(plan.boxes, plan.tags)]
    return {"caption": caption, "units": "normalized", "boxes": boxes}


def plan_spec(planner_path: str, gen, caption: str, out: str) -> str:
    """`structmar sample --prompt --planner`: plan a layout for `caption` with the image model `gen`'s text
    encoder, write it as `out`/layout.json and return that path."""
    from structmar import atomic

    planner = load_planner(planner_path, gen.device)
    check_categories(planner, gen.categories or None, "the image model")
    plan = plan_captions(planner, gen.text_encoder, [caption], max_boxes=gen.model.cfg.max_objects)[0]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "layout.json")
    atomic.write_text(path, json.dumps(layout_spec_json(caption, plan), indent=2))
    return path


# ---- evaluation -----------------------------------------------------------------------------------

COUNT_SCORE = 0.5  # detections counted as objects in the generated images (the evaluation's own floor is lower)
_RELATION = re.compile(r"^a (\w+ \w+) (to the left of|to the right of|above|below) a (\w+ \w+)$")


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from structmar.reward import box_iou

    return box_iou(a, b) if len(a) and len(b) else np.zeros((len(a), len(b)))


def _set_scores(predicted: list[np.ndarray], truth: list[np.ndarray]) -> dict:
    """Mean over images of the category-set precision and recall of `predicted` against `truth` (id arrays)."""
    precision, recall = [], []
    for p, t in zip(predicted, truth):
        p, t = set(p.tolist()), set(t.tolist())
        precision.append(len(p & t) / len(p) if p else float(not t))
        recall.append(len(p & t) / len(t) if t else 1.0)
    return dict(precision=float(np.mean(precision)), recall=float(np.mean(recall)))


def layout_agreement(plans: list[tuple[np.ndarray, np.ndarray]], targets: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Planned (boxes, category ids) against the ground truth's: category-set precision and recall, and the mean
    over ground-truth boxes of the best IoU of a planned box of its category (0 where the plan has none)."""
    best = []
    for (pb, pc), (tb, tc) in zip(plans, targets):
        iou = _box_iou(np.asarray(tb, np.float64), np.asarray(pb, np.float64))
        same = np.asarray(tc)[:, None] == np.asarray(pc)[None, :]
        best += np.where(same, iou, 0).max(1, initial=0).tolist()
    return dict(**_set_scores([p[1] for p in plans], [t[1] for t in targets]), mean_best_iou=float(np.mean(best)),
                num_boxes=float(np.mean([len(p[0]) for p in plans])))


def count_agreement(detections: list[dict], targets: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Detected objects (score >= COUNT_SCORE) against each image's ground-truth layout: category-set precision
    and recall, the share of images whose count of every category is right, the mean absolute count error."""
    found, exact, error = [], [], []
    for det, (_, tc) in zip(detections, targets):
        labels = det["labels"][det["scores"] >= COUNT_SCORE].numpy()
        found.append(labels)
        cats = set(labels.tolist()) | set(np.asarray(tc).tolist())
        diff = [abs(int((labels == c).sum()) - int((np.asarray(tc) == c).sum())) for c in cats]
        exact.append(float(sum(diff) == 0))
        error.append(float(sum(diff)))
    return dict(**_set_scores(found, [t[1] for t in targets]), counts_exact=float(np.mean(exact)),
                count_error=float(np.mean(error)))


def relation_holds(caption: str, boxes: np.ndarray, category_ids: np.ndarray) -> bool | None:
    """Whether some pair of `boxes` of the caption's two categories stands as a Shapes caption states ("a red
    circle to the left of a blue square"), by the rule that wrote the caption; None when it states no relation."""
    from structmar.shapes import CATEGORIES, _relation

    found = _RELATION.match(caption)
    if not found:
        return None
    by_name = {c.name: c for c in CATEGORIES}
    first, second = by_name.get(found.group(1)), by_name.get(found.group(3))
    if first is None or second is None:
        return None
    ids = np.asarray(category_ids)
    return any(_relation({"box": boxes[i], "category": first}, {"box": boxes[j], "category": second}) == caption
               for i in np.flatnonzero(ids == first.id) for j in np.flatnonzero(ids == second.id) if i != j)


def relation_shares(planner: Planner, text_encoder, layouts, seed: int = 0) -> dict | None:
    """On Shapes: of the captions stating a relation (every caption of `layouts`, not only the first), the share
    the planned boxes satisfy, against the ground-truth layouts' share (the ceiling: the rule wrote the caption
    from them) and shuffled layouts' (chance: each ground-truth layout's boxes permuted among its objects,
    seeded). None where no caption states one."""
    stated = [(caption, lay) for lay in layouts for caption in lay.captions
              if relation_holds(caption, lay.boxes, lay.category_ids) is not None]
    if not stated:
        return None
    rng = np.random.default_rng(seed)
    planned, truth, shuffled = [], [], []
    for start in range(0, len(stated), 64):
        chunk = stated[start:start + 64]
        plans = plan_captions(planner, text_encoder, [c for c, _ in chunk], notify=False)
        for (caption, lay), plan in zip(chunk, plans):
            planned.append(relation_holds(caption, plan.boxes, plan.category_ids))
            truth.append(relation_holds(caption, lay.boxes, lay.category_ids))
            shuffled.append(relation_holds(caption, lay.boxes[rng.permutation(len(lay.boxes))], lay.category_ids))
    return dict(num_captions=len(stated), planned=float(np.mean(planned)), ground_truth=float(np.mean(truth)),
                shuffled=float(np.mean(shuffled)))


def planner_results(planner: Planner, text_encoder, layouts, merged: dict, image_size: tuple[int, int],
                    categories: dict[int, str]) -> dict:
    """`structmar eval --planner`'s own block: the planned layouts against the ground truth (next to another
    image's ground truth, the chance level), the generated images' detected categories and counts against the
    caption's own image's layout (next to the real image's, the ceiling), how well the images follow the planned
    layouts, and on Shapes the relations the plans satisfy."""
    from structmar.metrics import layout_scores

    targets = [(lay.boxes, lay.category_ids) for lay in layouts]
    plans = [(p["boxes"].numpy(), p["category_ids"].numpy()) for p in merged["planned"]]
    return dict(
        planner=planner.export_path,
        layouts=dict(planned=layout_agreement(plans, targets),
                     mismatched=layout_agreement(targets[1:] + targets[:1], targets)),
        objects=dict(generated=count_agreement(merged["eval_generated"], targets),
                     real=count_agreement(merged["eval_real"], targets)),
        follows_plan=layout_scores(merged["eval_generated"], plans, image_size, categories),
        relations=relation_shares(planner, text_encoder, layouts),
    )


def planner_markdown(block: dict) -> list[str]:
    """The report's lines for `planner_results`."""
    lay, obj, follows = block["layouts"], block["objects"], block["follows_plan"]
    lines = [f"## Caption only: layouts planned by `{block['planner']}`", "",
             "| planned layouts vs ground truth | planned | another image's layout (chance) |", "|---|---|---|"]
    for label, key in (("category precision", "precision"), ("category recall", "recall"),
                       ("mean best IoU (same category)", "mean_best_iou"), ("boxes per layout", "num_boxes")):
        lines.append(f"| {label} | {lay['planned'][key]:.3f} | {lay['mismatched'][key]:.3f} |")
    lines += ["", f"| objects detected (score >= {COUNT_SCORE}) vs the caption's image's layout | generated | "
                  "real image (ceiling) |", "|---|---|---|"]
    for label, key in (("category precision", "precision"), ("category recall", "recall"),
                       ("every count right", "counts_exact"), ("mean absolute count error", "count_error")):
        lines.append(f"| {label} | {obj['generated'][key]:.3f} | {obj['real'][key]:.3f} |")
    lines += ["", f"The generated images against the planned layouts: AP50 {follows['ap50']:.3f}, success rate "
                  f"{follows['success_rate']:.3f}.", ""]
    rel = block["relations"]
    if rel:
        lines += [f"Stated relations satisfied ({rel['num_captions']} captions): planned {rel['planned']:.3f}, "
                  f"ground-truth layouts (ceiling) {rel['ground_truth']:.3f}, shuffled layouts (chance) "
                  f"{rel['shuffled']:.3f}.", ""]
    return lines
