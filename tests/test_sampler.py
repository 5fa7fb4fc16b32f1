"""`structmar sample` and its loader (structmar.sampler): layout-spec validation, the command end to end on a tiny
random export, and a trained export's record of its text encoder, tokenizer and categories."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from structmar.cli import main
from structmar.config import model_config
from structmar.model import StructMAR, write_export
from structmar.sample import condition_batch, parse_layout_spec, read_layout_spec
from structmar.text import write_random_clip

GOOD = {"caption": "a red circle left of a blue square",
        "boxes": [{"box": [0.05, 0.2, 0.45, 0.6], "tag": "red circle"},
                  {"box": [0.5, 0.3, 0.95, 0.9], "tag": "blue square"}]}


def _with(**changes):
    spec = json.loads(json.dumps(GOOD))
    spec.update(changes)
    return spec


def _box(i, **changes):
    spec = json.loads(json.dumps(GOOD))
    spec["boxes"][i].update(changes)
    return spec


@pytest.mark.parametrize("spec, message", [
    ([1, 2], "a layout spec is a JSON object"),
    (_with(boxs=[]), "boxs: unknown field"),
    (_with(caption=3), "caption: expected a string"),
    (_with(units="inches"), 'units: "inches" is not one of'),
    (_with(units="pixels"), 'image_size: missing: "units": "pixels" needs'),
    (_with(units="pixels", image_size=[64, 0]), "image_size: expected a positive integer or [width, height]"),
    (_with(image_size="big"), "image_size: expected a positive integer"),
    (_with(boxes={"box": [0, 0, 1, 1]}), "boxes: expected a list"),
    (_with(boxes=[[0, 0, 1, 1]]), "boxes[0]: expected an object"),
    (_box(1, colour="blue"), "boxes[1].colour: unknown field"),
    (_with(boxes=[{"tag": "red circle"}]), "boxes[0].box: missing"),
    (_box(0, box=[0.1, 0.2, 0.3]), "boxes[0].box: expected four numbers"),
    (_box(0, box=[0.1, 0.2, "0.3", 0.4]), "boxes[0].box: expected four numbers"),
    (_box(0, box=[0.1, 0.2, True, 0.4]), "boxes[0].box: expected four numbers"),
    (_box(1, box=[0.95, 0.1, 0.9, 0.5]), "boxes[1].box: x1 0.9 < x0 0.95"),
    (_box(1, box=[0.1, 0.5, 0.9, 0.5]), "boxes[1].box: y1 0.5 = y0 0.5"),
    (_box(0, box=[0.1, 0.2, 0.5, 1.2]), 'boxes[0].box: y1 1.2 is outside [0, 1] (pixel boxes need "units"'),
    (_box(0, box=[-0.1, 0.2, 0.5, 0.6]), "boxes[0].box: x0 -0.1 is outside [0, 1]"),
    (_with(units="pixels", image_size=[64, 32], boxes=[{"box": [0, 0, 40, 33], "tag": "x"}]),
     "boxes[0].box: y1 33 is outside [0, 32] (image_size 64x32)"),
    (_with(boxes=[{"box": [0, 0, 1, 1]}]), "boxes[0].tag: missing"),
    (_box(1, tag="  "), "boxes[1].tag: expected a non-empty string"),
    (_box(1, tag=7), "boxes[1].tag: expected a non-empty string"),
])
def test_malformed_specs_name_the_field(spec, message):
    with pytest.raises(ValueError) as err:
        parse_layout_spec(spec, source="layout.json")
    assert str(err.value).startswith("layout.json: ") and message in str(err.value)


def test_spec_units():
    spec = parse_layout_spec(GOOD)
    assert spec.caption == GOOD["caption"] and spec.tags == ["red circle", "blue square"]
    np.testing.assert_allclose(spec.boxes, [b["box"] for b in GOOD["boxes"]], rtol=1e-6)
    pixels = parse_layout_spec({"units": "pixels", "image_size": [200, 100],
                                "boxes": [{"box": [20, 10, 200, 60], "tag": " a cat on a mat "}]})
    np.testing.assert_allclose(pixels.boxes, [[0.1, 0.1, 1.0, 0.6]], rtol=1e-6)
    assert pixels.tags == ["a cat on a mat"] and pixels.caption == ""
    square = parse_layout_spec({"units": "pixels", "image_size": 50, "boxes": [{"box": [0, 5, 25, 50], "tag": "x"}]})
    np.testing.assert_allclose(square.boxes, [[0.0, 0.1, 0.5, 1.0]], rtol=1e-6)
    empty = parse_layout_spec({"caption": "just a caption"})
    assert empty.boxes.shape == (0, 4) and empty.tags == []


def test_spec_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json does not exist"):
        read_layout_spec(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"caption": "x",')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_layout_spec(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_box(0, box=[0.5, 0.1, 0.2, 0.4])))
    with pytest.raises(ValueError, match=r"wrong.json: boxes\[0\].box: x1 0.2 < x0 0.5"):
        read_layout_spec(str(wrong))


@pytest.fixture(scope="module")
def export(tiny_export):
    """A random tiny StructMAR export (pixel tokenizer, 32 px) whose EMA differs from its raw weights."""
    made = tiny_export("sample")
    spec = made["dir"] / "layout.json"
    spec.write_text(json.dumps(GOOD))
    return dict(made, spec=str(spec))


def _sample(export, out, *extra):
    return main(["sample", "--checkpoint", export["path"], "--layout", export["spec"], "--out", str(out),
                 "--clip_path", export["clip"], "--num_images", "3", "--batch_size", "2", "--num_iter", "3",
                 "--temperature", "0.8", "--device", "cpu", *extra])


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_writes_images_and_overlays_deterministically(export, tmp_path):
    assert _sample(export, tmp_path / "a", "--seed", "3") == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["000.png", "000_layout.png", "001.png", "001_layout.png", "002.png", "002_layout.png",
                     "grid_layout.png", "sample.json"]
    image = _read(tmp_path / "a" / "000.png")
    assert image.shape == (32, 32, 3) and image.std() > 0
    overlay = _read(tmp_path / "a" / "000_layout.png")
    assert overlay.shape == (256, 256, 3)
    x0, y0 = round(0.05 * 256), round(0.2 * 256)
    assert (overlay[y0 + 30:y0 + 60, x0] == 0).all()  # the red circle's box edge is drawn in black
    record = json.loads((tmp_path / "a" / "sample.json").read_text())
    assert record["caption"] == GOOD["caption"] and record["weights"] == "ema" and record["seed"] == 3
    assert record["tags"] == ["red circle", "blue square"] and record["num_iter"] == 3

    # same seed: the same pixels (the sampler draws only from its seeded generator, not the global RNG)
    assert _sample(export, tmp_path / "b", "--seed", "3") == 0
    for name in ("000.png", "001.png", "002.png", "002_layout.png"):
        assert np.array_equal(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name))
    assert not np.array_equal(_read(tmp_path / "a" / "000.png"), _read(tmp_path / "a" / "001.png"))

    assert _sample(export, tmp_path / "d", "--seed", "3", "--no-ema", "--prompt", "two shapes") == 0
    record = json.loads((tmp_path / "d" / "sample.json").read_text())
    assert record["weights"] == "model" and record["caption"] == "two shapes"
    assert not np.array_equal(_read(tmp_path / "a" / "000.png"), _read(tmp_path / "d" / "000.png"))  # other weights


def _error(capsys, code):
    """The error line (progress bars of transformers' loaders may come before it)."""
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("structmar: error: ")
    return err


def test_sample_errors_are_one_line(export, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_box(1, box=[0.95, 0.1, 0.9, 0.5])))
    err = _error(capsys, main(["sample", "--checkpoint", export["path"], "--layout", str(bad), "--out",
                               str(tmp_path / "o"), "--clip_path", export["clip"]]))
    assert err.endswith(f"{bad}: boxes[1].box: x1 0.9 < x0 0.95")
    assert not (tmp_path / "o").exists()

    no_caption = tmp_path / "no_caption.json"
    no_caption.write_text(json.dumps({"boxes": GOOD["boxes"]}))
    err = _error(capsys, main(["sample", "--checkpoint", export["path"], "--layout", str(no_caption), "--out",
                               str(tmp_path / "o"), "--clip_path", export["clip"]]))
    assert "caption: missing" in err and "--prompt" in err

    crowded = tmp_path / "crowded.json"
    crowded.write_text(json.dumps({"caption": "many", "boxes": [{"box": [0, 0, 0.5, 0.5], "tag": "x"}] * 5}))
    err = _error(capsys, main(["sample", "--checkpoint", export["path"], "--layout", str(crowded), "--out",
                               str(tmp_path / "o"), "--clip_path", export["clip"], "--device", "cpu"]))
    assert "boxes: 5 boxes, more than the model's max_objects=4" in err

    wide = write_random_clip(str(tmp_path / "wide_clip"), seed=0, size="base")
    err = _error(capsys, main(["sample", "--checkpoint", export["path"], "--layout", export["spec"], "--out",
                               str(tmp_path / "o"), "--clip_path", wide, "--device", "cpu"]))
    assert "is 512 wide but the model was trained on 32-wide text embeddings" in err

    err = _error(capsys, main(["sample", "--checkpoint", str(tmp_path), "--layout", export["spec"], "--out",
                               str(tmp_path / "o"), "--clip_path", export["clip"]]))
    assert "is a directory without checkpoint-last.safetensors" in err
    err = _error(capsys, main(["sample", "--checkpoint", export["path"], "--layout", export["spec"], "--out",
                               str(tmp_path / "o"), "--clip_path", export["clip"], "--num_iter", "0"]))
    assert "--num_iter must be >= 1" in err


def test_condition_batch_follows_the_batch_contract(export):
    from structmar.text import TextEncoder

    encoder = TextEncoder.from_pretrained(export["clip"])
    boxes = [np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]]), np.zeros((0, 4))]
    batch = condition_batch(encoder, ["two shapes", "nothing"], boxes, [["red circle", "a dog"], []],
                            [np.array([1, 7]), np.array([], dtype=np.int64)], [42, 43])
    assert batch["boxes"].shape == (2, 2, 4) and batch["tag_embeds"].shape == (2, 2, 32)
    assert batch["box_mask"].tolist() == [[True, True], [False, False]]
    assert batch["category_ids"].tolist() == [[1, 7], [-1, -1]] and batch["image_ids"].tolist() == [42, 43]
    assert torch.equal(batch["boxes"][1], torch.zeros(2, 4)) and torch.equal(batch["tag_embeds"][1], torch.zeros(2, 32))
    torch.testing.assert_close(batch["tag_embeds"][0], encoder.encode_tags(["red circle", "a dog"]))
    tokens, mask, pooled = encoder.encode(["two shapes", "nothing"])
    assert torch.equal(batch["text_mask"], mask) and torch.equal(batch["text_pooled"], pooled)
    with pytest.raises(ValueError, match="layout 0: 2 boxes but 1 tags"):
        condition_batch(encoder, ["x"], boxes[:1], [["red circle"]])


@pytest.fixture(scope="module")
def trained(pixel_shards, tmp_path_factory):
    """One CPU step of `structmar train` on Shapes shards (built with root/clip) from a random init export: its
    run directory records the text encoder, tokenizer and category names."""
    root = pixel_shards("sampler", 16, 4, samples_per_shard=16)
    cfg = model_config("tiny", text_dim=32, num_sampling_steps=4)
    torch.manual_seed(0)
    write_export(str(root / "init.safetensors"), StructMAR(cfg).state_dict(), StructMAR(cfg).state_dict(), cfg)
    run = root / "stage"
    assert main(["train", "--output_dir", str(run), "--data", str(root / "shards"), "--resume",
                 str(root / "init.safetensors"), "--batch_size", "2", "--epochs", "1", "--max_steps", "1",
                 "--warmup_epochs", "0", "--lr", "1e-3", "--device", "cpu", "--precision", "fp32", "--num_workers",
                 "0", "--sample_every", "0"]) == 0
    return root, run


def test_an_export_records_what_it_was_trained_with(trained):
    from structmar.files import weights_sha256
    from structmar.model import read_weights
    from structmar.sampler import load_sampler
    from structmar.shapes import CATEGORIES

    root, run = trained
    record = read_weights(str(run / "checkpoint-last.safetensors")).trained_with
    assert record.text_encoder["path"] == str(root / "clip")
    assert record.text_encoder["sha256"] == weights_sha256(str(root / "clip"))
    assert record.tokenizer == dict(name="pixel", path=None, sha256=None)
    gen = load_sampler(str(run))  # no clip_path: the recorded one
    assert gen.categories == record.categories == {c.id: c.name for c in CATEGORIES}
    assert gen.text_encoder.dim == 32


def test_sample_uses_the_recorded_text_encoder_and_refuses_another(trained, tmp_path, capsys):
    root, run = trained
    spec = tmp_path / "layout.json"
    spec.write_text(json.dumps(GOOD))
    sample = ["sample", "--checkpoint", str(run), "--layout", str(spec), "--num_images", "1", "--num_iter", "2",
              "--device", "cpu"]
    assert main([*sample, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "000.png").is_file()

    other = write_random_clip(str(tmp_path / "other_clip"), seed=1, size="tiny")  # same shape, other weights
    err = _error(capsys, main([*sample, "--out", str(tmp_path / "b"), "--clip_path", other]))
    assert f"{run / 'checkpoint-last.safetensors'} was trained with the text encoder {root / 'clip'}" in err
    assert f"--clip_path gives {other}" in err

    moved = root / "clip"
    moved.rename(root / "clip-moved")
    try:
        err = _error(capsys, main([*sample, "--out", str(tmp_path / "c")]))
        assert f"its text encoder {moved} is not there; pass --clip_path" in err
        assert main([*sample, "--out", str(tmp_path / "c"), "--clip_path", str(root / "clip-moved")]) == 0
    finally:
        (root / "clip-moved").rename(moved)


def test_the_next_stage_refuses_shards_of_another_text_encoder(trained, tmp_path, capsys):
    from structmar.shards import run_build

    root, run = trained
    other = write_random_clip(str(tmp_path / "other_clip"), seed=1, size="tiny")
    run_build(dict(coco_root=str(root / "coco"), coco_split="train2014", out=str(tmp_path / "shards"),
                   tokenizer="pixel", vae_path=None, pixel_patch=4, clip_path=other, image_size=32, max_objects=16,
                   min_box_area=0.002, samples_per_shard=16, batch_size=64, num_workers=1, worker_rank=None,
                   device="cpu", verify=False, progress=False))
    err = _error(capsys, main(["train", "--output_dir", str(tmp_path / "next"), "--data", str(tmp_path / "shards"),
                               "--resume", str(run), "--device", "cpu", "--precision", "fp32"]))
    assert (f"--resume {run / 'checkpoint-last.safetensors'} was trained with the text encoder {root / 'clip'}"
            in err and f"the shards {tmp_path / 'shards'} were built with {other}" in err)
    assert not (tmp_path / "next").exists()
