"""structmar.planner: the set matching and loss, training through the stage loop (loss falls, exact resume),
`sample --prompt --planner`, `eval --planner`, and its bad inputs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from structmar.config import PlannerConfig, PlannerTrainConfig, model_config
from structmar.files import load_safetensors
from structmar.model import EXPORT, StructMAR, TrainedWith, write_export
from structmar.planner import Planner, match, run_train_planner, set_loss

CATEGORIES = [[1, "red circle"], [2, "red square"], [5, "blue square"]]


def _logits(classes, num_queries, num_classes, margin=50.0):
    """Logits saying class `classes[q]` for the first queries and "no object" for the rest, by `margin`."""
    logits = torch.zeros(num_queries, num_classes + 1)
    for q in range(num_queries):
        logits[q, classes[q] if q < len(classes) else num_classes] = margin
    return logits


def test_matching_finds_the_permutation_and_a_perfect_prediction_costs_nothing():
    cfg = PlannerConfig(categories=CATEGORIES)
    target_classes = torch.tensor([2, 0, 1])
    target_boxes = torch.tensor([[0.2, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.4], [0.5, 0.2, 0.1, 0.1]])
    order = torch.tensor([3, 0, 1])  # prediction q answers target order.argsort()[q]... built below
    boxes = torch.rand(5, 4) * 0.5 + 0.25
    classes = [0] * 5
    for t, q in enumerate(order.tolist()):
        boxes[q] = target_boxes[t]
        classes[q] = int(target_classes[t])
    logits = _logits(classes, 5, 3)
    logits[[2, 4]] = _logits([], 2, 3)  # the unmatched queries say "no object"
    [(rows, cols)] = match(logits[None], boxes[None], [(target_classes, target_boxes)], cfg)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 0, 2: 1}
    loss, parts = set_loss(logits[None], boxes[None], [(target_classes, target_boxes)], cfg)
    assert loss.item() < 1e-6 and all(v.item() < 1e-6 for v in parts.values())

    # the boxes a little off: L1 and GIoU grow with the error, and giou_weight 0 leaves GIoU out of the loss
    shifted = boxes.clone()
    shifted[order] += 0.05
    loss, parts = set_loss(logits[None], shifted[None], [(target_classes, target_boxes)], cfg)
    assert parts["loss_l1"].item() == pytest.approx(4 * 0.05, rel=1e-4)  # summed over cxcywh, per box
    assert parts["loss_giou"].item() > 0.05
    assert loss.item() == pytest.approx(5 * parts["loss_l1"].item() + 2 * parts["loss_giou"].item(), rel=1e-4)
    no_giou = PlannerConfig(categories=CATEGORIES, giou_weight=0.0)
    assert set_loss(logits[None], shifted[None], [(target_classes, target_boxes)], no_giou)[0].item() == \
        pytest.approx(5 * parts["loss_l1"].item(), rel=1e-4)

    # a wrong class at the right box: cross-entropy only; an unmatched query claiming an object costs too
    wrong = logits.clone()
    wrong[3] = _logits([0], 1, 3)[0]
    assert set_loss(wrong[None], boxes[None], [(target_classes, target_boxes)], cfg)[1]["loss_ce"].item() > 1.0
    extra = logits.clone()
    extra[2] = _logits([1], 1, 3)[0]
    assert set_loss(extra[None], boxes[None], [(target_classes, target_boxes)], cfg)[1]["loss_ce"].item() > 1.0


def test_the_matching_cost_uses_giou_when_l1_cannot_tell():
    """Two predictions at equal L1 distance from a target: GIoU prefers the one that overlaps it."""
    cfg = PlannerConfig(categories=CATEGORIES, class_weight=0.0)
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    inside = torch.tensor([0.5, 0.5, 0.3, 0.3])  # L1 0.2, overlapping
    apart = torch.tensor([0.7, 0.5, 0.2, 0.2])  # L1 0.2, touching only
    [(rows, _)] = match(torch.zeros(1, 2, 4), torch.stack([apart, inside])[None], [(torch.tensor([0]), target)], cfg)
    assert rows.tolist() == [1]


def test_a_planner_reads_tokens_pooled_or_both():
    batch = dict(text_tokens=torch.randn(2, 5, 32), text_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool(),
                 text_pooled=torch.randn(2, 32))
    for text_input in ("tokens", "pooled", "both"):
        cfg = PlannerConfig(categories=CATEGORIES, text_dim=32, text_input=text_input, depth=3).validate()
        outputs = Planner(cfg).eval().predict(batch)
        assert len(outputs) == 3 and outputs[-1][0].shape == (2, 8, 4) and outputs[-1][1].shape == (2, 8, 4)
        assert outputs[-1][1].min() >= 0 and outputs[-1][1].max() <= 1
    # padding is ignored: changing padded token states changes nothing
    planner = Planner(PlannerConfig(categories=CATEGORIES, text_dim=32)).eval()
    changed = dict(batch, text_tokens=batch["text_tokens"].clone())
    changed["text_tokens"][0, 3:] = 7.0
    assert torch.allclose(planner.predict(batch)[-1][1], planner.predict(changed)[-1][1])


# ---- training, sampling and evaluation on Shapes ------------------------------------------------------


@pytest.fixture(scope="module")
def data(pixel_shards):
    return pixel_shards("planner", 256, 16, 64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A small model's steps are overhead-bound: more threads on 2 shared cores only contend (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(data, out, **kw) -> PlannerTrainConfig:
    spec = dict(output_dir=str(out), data=str(data / "shards"), coco_split="train2014", model="tiny", batch_size=32,
                epochs=1000, lr=2e-3, device="cpu", precision="fp32", deepspeed_config="zero2", num_workers=0,
                log_every=1, save_last_freq=1000, seed=0)
    return PlannerTrainConfig(**{**spec, **kw})


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("planner") / "run"
    summary = run_train_planner(_config(data, out, max_steps=40))
    assert summary.step == 40
    return out


def test_training_lowers_the_loss_and_exports_config_and_categories(trained):
    losses = _losses(trained)
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
    assert last < 0.8 * first, (first, last)
    _, meta = load_safetensors(str(trained / EXPORT), "planner export")
    assert meta["stage"] == "planner"
    assert [name for _, name in json.loads(meta["config"])["categories"]][:2] == ["red circle", "red square"]
    assert json.loads(meta["categories"])["1"] == "red circle"
    assert (trained / "tensorboard").is_dir()


def test_a_continued_run_repeats_the_uninterrupted_losses_and_weights(data, trained, tmp_path):
    out = tmp_path / "run"
    run_train_planner(_config(data, out, max_steps=25, save_steps=100))
    summary = run_train_planner(_config(data, out, max_steps=40))
    assert summary.step == 40
    reference, resumed = _losses(trained), _losses(out)
    assert [resumed[s] for s in range(26, 41)] == [reference[s] for s in range(26, 41)]
    a, b = load_file(str(trained / EXPORT)), load_file(str(out / EXPORT))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _image_model(data, path, categories=None):
    """A fresh tiny StructMAR export carrying the shards' categories (or `categories`), as a stage's export does."""
    cfg = model_config("tiny", text_dim=32)
    torch.manual_seed(0)
    sd = StructMAR(cfg).state_dict()
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    trained_with = TrainedWith.of_shards(manifest, "train2014")
    if categories is not None:
        trained_with.categories = {int(k): v for k, v in categories.items()}
    write_export(str(path), sd, sd, cfg, {"stage": "full"}, trained_with)
    return path


def test_sample_plans_the_prompts_layout_writes_it_and_samples(data, trained, tmp_path, capsys):
    from structmar.cli import main
    from structmar.sample import read_layout_spec

    image = _image_model(data, tmp_path / "image.safetensors")
    out = tmp_path / "samples"
    long_caption = "a red circle to the left of a blue square " + "and a green triangle " * 20
    flags = ["sample", "--checkpoint", str(image), "--planner", str(trained), "--out", str(out), "--num_images", "2",
             "--num_iter", "2", "--clip_path", str(data / "clip"), "--device", "cpu"]
    assert main([*flags, "--prompt", long_caption]) == 0
    err = capsys.readouterr().err
    assert "structmar: notice: caption 0 has" in err and "truncated to its first 77" in err
    spec = read_layout_spec(str(out / "layout.json"))
    assert spec.caption == long_caption.strip() and 1 <= len(spec.boxes) <= 8
    names = {name for _, name in PlannerConfig.from_dict(json.loads(
        load_safetensors(str(trained / EXPORT), "planner export")[1]["config"])).categories}
    assert set(spec.tags) <= names
    record = json.loads((out / "sample.json").read_text())
    assert record["tags"] == spec.tags and (out / "000.png").is_file() and (out / "001_layout.png").is_file()

    # a planner whose categories are not the image model's: one line naming the difference
    other = dict(json.loads((data / "shards" / "manifest.json").read_text())["categories"])
    other.pop("12")
    other["3"] = "red triangular thing"
    mismatched = _image_model(data, tmp_path / "other.safetensors", categories=other)
    assert main(["sample", "--checkpoint", str(mismatched), "--planner", str(trained), "--out", str(tmp_path / "x"),
                 "--prompt", "a red circle", "--clip_path", str(data / "clip"), "--device", "cpu"]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("structmar: error:")]
    assert "categories differ from the image model's" in line
    assert "only the planner has 12 'blue triangle'" in line
    assert "id 3 is 'red triangle' vs 'red triangular thing'" in line
    # neither a layout nor a planner, or a planner with no prompt
    assert main(["sample", "--checkpoint", str(image), "--out", str(tmp_path / "y")]) == 2
    assert main([*flags]) == 2


def test_eval_with_a_planner_scores_plans_objects_and_relations(data, trained, tmp_path):
    from structmar.evaluate import EvalOptions, run_eval

    image = _image_model(data, tmp_path / "image.safetensors")
    out = tmp_path / "eval"
    results = run_eval(EvalOptions(checkpoint=str(image), planner=str(trained), coco_root=str(data / "coco"),
                                   out=str(out), num_layouts=8, eval_detector="shapes", clip_path=str(data / "clip"),
                                   num_iter=2, batch_size=4, device="cpu"), rank=0, world_size=1)
    block = results["planner"]
    for which in ("planned", "mismatched"):
        assert set(block["layouts"][which]) == {"precision", "recall", "mean_best_iou", "num_boxes"}
        assert all(0 <= block["layouts"][which][k] <= 1 for k in ("precision", "recall", "mean_best_iou"))
    for which in ("generated", "real"):
        assert set(block["objects"][which]) == {"precision", "recall", "counts_exact", "count_error"}
    assert block["objects"]["real"]["recall"] > 0.9  # the analytic detector finds the real images' objects
    rel = block["relations"]
    assert rel["num_captions"] > 0 and rel["ground_truth"] == 1.0 and 0 <= rel["shuffled"] < 1
    assert 0 <= rel["planned"] <= 1 and "ap50" in block["follows_plan"]
    report = (out / "results.md").read_text()
    assert "## Caption only" in report and "Stated relations satisfied" in report
