import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import write_two_tower_clip

from structmar.cli import main
from structmar.coco import CocoLayouts
from structmar.config import model_config
from structmar.evaluate import EvalOptions, load_evaluation, run_eval
from structmar.metrics import FIDInception, frechet_distance, paired_differences
from structmar.model import StructMAR, write_export
from structmar.shapes import generate_shapes
from structmar.text import write_random_clip

# ---- `structmar eval` end to end on a tiny Shapes val set ---------------------------------------------


class ColourStats(torch.nn.Module):
    """A cheap stand-in for the FID Inception (test_metrics.py tests the real one): per-channel means and stds."""

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


def paired_difference(a: dict, b: dict, bootstrap: int = 100) -> dict:
    return paired_differences(a, [b], bootstrap)[0]


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
