import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from structmar.cli import main
from structmar.coco import CocoLayouts
from structmar.config import model_config
from structmar.evaluate import (
    ClipScorer,
    EvalOptions,
    FIDInception,
    draw_layout,
    frechet_distance,
    headroom,
    image_grid,
    inception_features,
    load_evaluation,
    paired_difference,
    paired_differences,
    run_eval,
)
from structmar.model import StructMAR, write_export
from structmar.reward import load_detector
from structmar.shapes import generate_shapes
from structmar.text import write_random_clip


def test_overlay_draws_boxes_and_tags():
    image = torch.zeros(3, 32, 32)
    image[1] = 1.0  # green
    out = draw_layout(image, np.array([[0.25, 0.25, 0.75, 0.75]]), ["red circle"])
    assert out.size == (256, 256)  # upscaled for legibility
    px = np.asarray(out)
    assert (px[64:192, 64] == 0).all()  # the left edge of the box is black
    assert (px[150, 150] == [0, 255, 0]).all()  # inside, away from the label, the image shows through
    assert (px[10, 10] == [0, 255, 0]).all()
    label = px[64:82, 64:120]  # the tag's black label with (antialiased) white text
    assert (label == 0).all(-1).mean() > 0.3 and (label > 200).all(-1).sum() > 20
    blank = np.asarray(draw_layout(image, np.zeros((0, 4)), []))
    assert (blank == [0, 255, 0]).all()


def test_grid_layout():
    tiles = [draw_layout(torch.rand(3, 16, 16), np.zeros((0, 4)), [], min_side=16) for _ in range(6)]
    grid = image_grid(tiles, ncol=4, pad=2)
    assert grid.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)
    with pytest.raises(ValueError):
        image_grid([])


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception.pth"
    torch.manual_seed(0)
    torch.save(FIDInception().net.state_dict(), path)
    return str(path)


def test_frechet_distance_matches_the_matrix_square_root_form():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for n, m in ((200, 150), (12, 9)):  # more samples than dimensions (eigenvalue route) and fewer (nuclear norm)
        a, b = rng.normal(size=(n, 32)), rng.normal(0.3, 1.5, size=(m, 32)) @ rng.normal(size=(32, 32))
        ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
        assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fid_with_inception_from_file(inception_file, tmp_path):
    model = FIDInception.from_file(inception_file)
    g = torch.Generator().manual_seed(0)
    set_a = [torch.rand(3, 32, 32, generator=g) for _ in range(5)]
    set_b = [torch.rand(3, 32, 32, generator=g) for _ in range(5)]
    set_c = [(0.5 * torch.rand(3, 32, 32, generator=g) + 0.5) * torch.tensor([1.0, 0.2, 0.2])[:, None, None]
             for _ in range(5)]
    fa, fb, fc = (inception_features(model, s, batch_size=4) for s in (set_a, set_b, set_c))
    assert fa.shape == (5, 2048)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-3)
    same_distribution, other = frechet_distance(fa, fb), frechet_distance(fa, fc)
    assert 0 < same_distribution < other  # a red-tinted set is farther than another uniform-noise set
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(fa[:1], fb)

    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        FIDInception.from_file(str(tmp_path / "absent.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="not an FID Inception state dict"):
        FIDInception.from_file(str(wrong))


def write_two_tower_clip(path: str) -> str:
    """A tiny random CLIP with both towers and an image processor, over write_random_clip's offline tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    write_random_clip(path, seed=0, size="tiny")
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_from_local_directory(tmp_path):
    path = str(tmp_path / "clip")
    write_random_clip(path, seed=0, size="tiny")  # the offline tokenizer (and a text-only model)
    with pytest.raises(ValueError, match="needs a full CLIP model"):
        ClipScorer(path)
    scorer = ClipScorer(write_two_tower_clip(path))
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    scores = scorer(images, ["a red circle", "a blue square above a green triangle", "two shapes"])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()
    assert scorer.model.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32)).pooler_output.shape == (1, 16)
    again = scorer(images, ["a red circle", "a blue square above a green triangle", "two shapes"])
    assert torch.equal(scores, again)
    other = scorer(images, ["zzz", "qqq", "xxx"])
    assert not torch.allclose(scores, other)


# ---- `structmar eval` end to end on a tiny Shapes val set ---------------------------------------------


class ColourStats(torch.nn.Module):
    """A cheap stand-in for the FID Inception (the real one is tested above): per-channel means and stds."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # inception_features reads the device off a parameter

    def forward(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)  # (B, 6)


@pytest.fixture(scope="module")
def shapes_eval(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    root = generate_shapes(d / "shapes", 0, 16, 32, seed=11)
    text_clip = write_random_clip(str(d / "clip"), seed=0, size="tiny")
    score_clip = write_two_tower_clip(str(d / "clip_score"))
    cfg = model_config("tiny", text_dim=32, num_sampling_steps=4, max_objects=8)
    torch.manual_seed(0)
    model = StructMAR(cfg)
    path = str(d / "checkpoint-last.safetensors")
    write_export(path, model.state_dict(), model.state_dict(), cfg, {"step": 0})
    inception = d / "stand_in_inception.pth"
    inception.write_bytes(b"")  # from_file is replaced by ColourStats below; the path only has to be given
    return dict(dir=d, root=str(root), clip=text_clip, score_clip=score_clip, path=path, inception=str(inception))


def _options(env, out, **changes):
    opts = EvalOptions(checkpoint=env["path"], coco_root=env["root"], coco_split="val2014", out=str(out),
                       eval_detector="shapes", reward_detector="shapes", clip_path=env["clip"],
                       clip_score_path=env["score_clip"], inception_path=env["inception"], num_iter=2,
                       batch_size=8, num_grids=2, device="cpu", seed=5)
    return dataclasses.replace(opts, **changes)


@pytest.fixture(scope="module")
def single_process(shapes_eval):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FIDInception, "from_file", classmethod(lambda cls, path, device="cpu": ColourStats()))
        out = shapes_eval["dir"] / "single"
        results = run_eval(_options(shapes_eval, out), rank=0, world_size=1)
    return out, results


def test_eval_reports_model_between_ceiling_and_chance(shapes_eval, single_process):
    out, results = single_process
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["num_layouts"] == 16 and results["image_size"] == 32 and results["world_size"] == 1
    assert results["weights"] == "ema" and results["sampling"]["num_iter"] == 2
    for kind in ("eval", "reward"):
        block = results["layout"][kind]
        for which in ("generated", "real", "mismatched"):
            m = block[which]
            for key in ("ap", "ap50", "ap75", "success_rate", "mean_iou", "centroid_distance", "reward"):
                assert isinstance(m[key], float), (kind, which, key)
            assert m["num_images"] == 16 and m["num_objects"] == results["num_objects"]
            assert m["success_rate_se"] is not None and m["reward_se"] is not None
        assert block["real"]["ap50"] >= 0.9 and block["real"]["success_rate"] >= 0.9  # the ceiling
        assert block["mismatched"]["ap50"] < 0.3 and block["mismatched"]["success_rate"] < 0.3  # chance
        assert block["real"]["reward"] > block["mismatched"]["reward"] + 3 * block["mismatched"]["reward_se"]
        g, r, c = (block[w]["success_rate"] for w in ("generated", "real", "mismatched"))
        assert block["position"]["success_rate"] == pytest.approx((g - c) / (r - c))
    assert any("evaluation detector is the reward detector" in n for n in results["notes"])

    samples = sorted(os.listdir(out / "samples"))
    assert len(samples) == 16 and samples[0].startswith("000000_")
    generated = [np.asarray(Image.open(out / "samples" / name).convert("RGB")) for name in samples]
    coco = CocoLayouts(shapes_eval["root"], "val2014", image_size=32, max_objects=8)
    real = [coco.image(lay) for lay in coco.layouts]
    features = lambda images: torch.cat([ColourStats()(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
                                                       .float() / 255)]).double().numpy()
    assert results["fid"]["value"] == pytest.approx(frechet_distance(features(generated), features(real)), rel=1e-4)
    for which in ("generated", "real"):
        clip = results["clip_score"][which]
        assert 0 <= clip["mean"] <= 100 and clip["se"] is not None

    # one 4x4 grid pair (16 layouts fill one), tiles upscaled to 256 px with the boxes drawn
    assert [os.path.basename(p) for p in results["figures"]] == ["generated_00.png", "real_00.png"]
    grid = Image.open(out / "figures" / "real_00.png")
    assert grid.size == (4 * 256 + 5 * 4, 4 * 256 + 5 * 4)
    md = (out / "results.md").read_text()
    assert "| AP50 |" in md and "real images (ceiling)" in md and "± is one standard error" in md
    assert "between chance (0) and the real-image ceiling (1): ap50" in md
    generated = results["layout"]["eval"]["generated"]
    assert f"| AP50 | {generated['ap50']:.3f} ± {generated['ap50_se']:.3f} |" in md


def test_eval_split_over_ranks_matches_one_process(shapes_eval, single_process, monkeypatch):
    """Two ranks (run one after the other: rank 0 waits on rank 1's file) give the one-process results."""
    monkeypatch.setattr(FIDInception, "from_file", classmethod(lambda cls, path, device="cpu": ColourStats()))
    _, expected = single_process
    out = shapes_eval["dir"] / "two_ranks"
    assert run_eval(_options(shapes_eval, out), rank=1, world_size=2) is None
    assert len(os.listdir(out / "samples")) == 8  # rank 1 generated its batch only
    results = run_eval(_options(shapes_eval, out), rank=0, world_size=2)
    assert results["world_size"] == 2 and len(os.listdir(out / "samples")) == 16
    assert results["layout"] == expected["layout"]
    assert results["fid"]["value"] == pytest.approx(expected["fid"]["value"], rel=1e-9)
    assert results["clip_score"] == expected["clip_score"]


def test_paired_difference_of_two_evaluations(shapes_eval, single_process, tmp_path):
    """B minus A on the same layouts equals the difference of their own figures; an evaluation against itself
    differs by 0 with standard error 0; other layouts or an unfinished directory are refused by name."""
    out, results = single_process
    a = load_evaluation(str(out))
    assert len(a["targets"]) == len(a["detections"]) == 16 and a["results"] == results
    assert paired_difference(a, a, bootstrap=5) == dict(num_layouts=16, ap50=0.0, ap50_se=0.0, success_rate=0.0,
                                                        success_rate_se=0.0, reward=0.0, reward_se=0.0)
    other = run_eval(_options(shapes_eval, tmp_path / "seed6", seed=6, clip_score_path=None, inception_path=None,
                              num_grids=0), rank=0, world_size=1)
    seed6 = load_evaluation(str(tmp_path / "seed6"))
    diff = paired_difference(a, seed6, bootstrap=20)
    assert paired_differences(a, [seed6, a], bootstrap=20) == [diff, paired_difference(a, a, bootstrap=20)]
    (pooled,) = paired_differences(a, [seed6, a], bootstrap=20, mean=True)  # the mean of seed6 - a and a - a
    for key in ("ap50", "success_rate", "reward"):
        assert pooled[key] == pytest.approx(diff[key] / 2, abs=1e-9), key
    assert pooled["reward_se"] == pytest.approx(diff["reward_se"] / 2)
    mine, theirs = results["layout"]["eval"]["generated"], other["layout"]["eval"]["generated"]
    for key in ("ap50", "success_rate", "reward"):
        assert diff[key] == pytest.approx(theirs[key] - mine[key], abs=1e-9), key
    assert diff["reward_se"] > 0 and diff["ap50_se"] is not None  # (an untrained model matches no box)
    run_eval(_options(shapes_eval, tmp_path / "fewer", num_layouts=8, clip_score_path=None, inception_path=None,
                      num_grids=0), rank=0, world_size=1)
    with pytest.raises(ValueError, match="scored different layouts"):
        paired_difference(a, load_evaluation(str(tmp_path / "fewer")))
    with pytest.raises(FileNotFoundError, match="absent/results.json is missing"):
        load_evaluation(str(tmp_path / "absent"))


def test_headroom_pass_at_one_and_at_k(shapes_eval):
    """pass@1 averages an object's success over its K samples, pass@K asks for one of them: the real image as
    every sample gives the two equal and no spread; the real image as one sample of K (blank images for the
    others) keeps pass@K, divides pass@1 by K and makes the real image each layout's best."""
    coco = CocoLayouts(shapes_eval["root"], "val2014", image_size=32, max_objects=8)
    detector = load_detector("shapes", None, coco.categories)
    k = 3

    def real(layouts):
        return torch.stack([torch.from_numpy(coco.image(lay)).permute(2, 0, 1).float() / 255 for lay in layouts])

    def first_real(layouts):  # each layout's K samples arrive side by side
        images = real(layouts)
        images[torch.arange(len(layouts)) % k != 0] = 0
        return images

    every = headroom(real, coco.layouts, detector, coco.categories, 32, k, batch_size=5)
    once = headroom(first_real, coco.layouts, detector, coco.categories, 32, k, batch_size=5)
    objects = sum(len(lay.category_ids) for lay in coco.layouts)
    assert every["layouts"] == once["layouts"] == 16 and every["all"]["objects"] == once["all"]["objects"] == objects
    assert every["all"]["pass1"] == every["all"]["passk"] >= 0.9
    assert every["reward_std_within"] == 0 and every["reward_best_of_k"] == pytest.approx(every["reward_mean"])
    assert once["all"]["passk"] == every["all"]["passk"]
    assert once["all"]["pass1"] == pytest.approx(every["all"]["pass1"] / k)
    assert once["reward_best_of_k"] == pytest.approx(every["reward_mean"]) and once["reward_std_within"] > 0
    assert once["reward_mean"] < every["reward_mean"]
    assert sum(v["objects"] for v in once["by_category"].values()) == objects
    assert set(once["by_category"]) <= set(coco.categories.values())


def test_eval_errors(shapes_eval, tmp_path, capsys):
    base = ["eval", "--checkpoint", shapes_eval["path"], "--coco_root", shapes_eval["root"], "--coco_split",
            "val2014", "--clip_path", shapes_eval["clip"], "--eval_detector", "shapes", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--inception_path", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "FID Inception weights" in err and "pt_inception-2015-12-05" in err
    assert not (tmp_path / "a").exists()  # nothing generated before the failure
    assert main([*base, "--out", str(tmp_path / "b"), "--reward_detector", "yolo"]) == 2
    assert "unknown detector 'yolo'" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--num_layouts", "1"]) == 2
    assert "evaluation needs at least 2" in capsys.readouterr().err

    # rank 0 waits for every rank and ignores another run's leftovers
    opts = _options(shapes_eval, tmp_path / "d", num_layouts=2, batch_size=1, clip_score_path=None,
                    inception_path=None, gather_timeout=1.0)
    os.makedirs(tmp_path / "d" / "parts")
    torch.save({"fingerprint": "another run"}, tmp_path / "d" / "parts" / "rank0001-of-0002.pt")
    with pytest.raises(TimeoutError, match="rank 1's results .* did not appear within 1 s"):
        run_eval(opts, rank=0, world_size=2)


def test_ap_bootstrap_standard_error():
    from structmar.evaluate import layout_scores
    from structmar.reward import layout_metrics, shapes_categories

    rng = np.random.default_rng(0)
    layouts, perfect, noisy = [], [], []
    for _ in range(24):
        xy = rng.uniform(0, 0.5, (2, 2))
        boxes, labels = np.concatenate([xy, xy + 0.4], 1), rng.integers(1, 13, 2)
        layouts.append((boxes, labels))
        px = torch.tensor(boxes * 64, dtype=torch.float32)
        perfect.append(dict(boxes=px, labels=torch.tensor(labels), scores=torch.ones(2)))
        shift = torch.tensor(rng.choice([0.0, 20.0], size=(2, 1)), dtype=torch.float32)  # half the boxes miss
        noisy.append(dict(boxes=px + shift, labels=torch.tensor(labels), scores=torch.rand(2)))
    exact = layout_scores(perfect, layouts, (64, 64), shapes_categories(), bootstrap=10)
    assert exact["ap50"] == pytest.approx(1.0) and exact["ap50_se"] == pytest.approx(0.0)
    mixed = layout_scores(noisy, layouts, (64, 64), shapes_categories(), bootstrap=10)
    assert 0.0 < mixed["ap50"] < 1.0 and mixed["ap50_se"] > 0.01
    assert mixed == layout_scores(noisy, layouts, (64, 64), shapes_categories(), bootstrap=10)  # seeded
    assert "ap50_se" not in layout_scores(noisy, layouts, (64, 64), shapes_categories())
    pooled = layout_metrics(noisy, layouts, (64, 64), shapes_categories())  # the same figures, matched once
    assert {key: mixed[key] for key in pooled} == pytest.approx(pooled, abs=1e-12)
