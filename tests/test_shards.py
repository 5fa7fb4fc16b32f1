import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from structmar.cli import main
from structmar.coco import CocoLayouts, flip_boxes
from structmar.config import model_config
from structmar.shapes import generate_shapes
from structmar.shard_tar import ShardError, iter_shard, write_shard
from structmar.shards import (
    PAYLOADS,
    ShardLoader,
    _resolve_slots,
    _schema,
    build_shards,
    decode_sample,
    read_manifest,
    verify_shards,
)
from structmar.text import TextEncoder, write_random_clip
from structmar.tokenizer import KLTokenizer, PixelTokenizer, write_random_kl16

SIZE, PER_SHARD, BATCH = 32, 8, 4
CFG = model_config("tiny", image_size=SIZE, text_dim=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, OpenMP threads spinning against other jobs cost 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    root = str(generate_shapes(base / "shapes", 40, 8, SIZE, seed=0, workers=1))
    clip = write_random_clip(str(base / "clip"), seed=0, size="tiny")
    text = TextEncoder.from_pretrained(clip)
    coco = CocoLayouts(root, "train2014", image_size=SIZE, max_objects=16, min_box_area=0.0)
    out = str(base / "out")
    build_shards(coco, out, PixelTokenizer(4), text, samples_per_shard=PER_SHARD, batch_size=16, progress=False,
                 build_args=dict(max_objects=16))
    return dict(base=base, root=root, clip=clip, text=text, coco=coco, out=out)


def _build(env, out, **kw):
    return build_shards(env["coco"], out, PixelTokenizer(4), env["text"], samples_per_shard=PER_SHARD,
                        batch_size=16, progress=False, build_args=dict(max_objects=16), **kw)


def _epoch(loader):
    return [b for b in loader]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_format_and_manifest(env):
    manifest = read_manifest(env["out"], "train2014")
    entry = manifest["splits"]["train2014"]
    assert entry["complete"] and entry["num_samples"] == 40 and len(entry["shards"]) == 5
    assert manifest["tokenizer"] == dict(name="pixel", id="pixel-p4", scale=1.0, channels=48, stride=4,
                                         latent_shape=[48, 8, 8])
    assert manifest["text_encoder"]["dim"] == 32 and manifest["image_size"] == SIZE
    assert entry["max_objects"] == 16 and manifest["categories"]["1"] == "red circle"
    with tarfile.open(os.path.join(env["out"], "train2014-000000.tar")) as tar:
        names = tar.getnames()
    assert len(names) == PER_SHARD * len(PAYLOADS)
    for name in names:
        key, ext = name.split(".", 1)
        assert len(key) == 12 and key.isdigit() and ext in PAYLOADS  # keys without dots, no pickles
    # Shard i holds the usable images with sorted-id ranks [8i, 8i + 8).
    ids = [int(r["__key__"]) for r in iter_shard(os.path.join(env["out"], "train2014-000002.tar"))]
    assert ids == [lay.image_id for lay in env["coco"].layouts[16:24]]
    assert verify_shards(env["out"], "train2014") == dict(shards=5, samples=40, skipped_images=[])


def test_batches_have_the_contract_shapes_and_ranges(env):
    loader = ShardLoader(env["out"], "train2014", CFG, BATCH, seed=0)
    assert len(loader) == 10
    by_id = {lay.image_id: lay for lay in env["coco"].layouts}
    tag_embed = dict(zip(["red circle", "blue square"], env["text"].encode_tags(["red circle", "blue square"]),
                         strict=True))
    seen = []
    for batch in loader:
        assert set(batch) == {"latents", "text_tokens", "text_mask", "text_pooled", "boxes", "box_mask",
                              "tag_embeds", "category_ids", "image_ids"}
        assert batch["latents"].shape == (BATCH, CFG.token_channels, CFG.grid_size, CFG.grid_size)
        assert batch["latents"].dtype == torch.float32 and batch["latents"].abs().max() <= 1.0 + 1e-3
        assert batch["text_tokens"].shape == (BATCH, 77, 32) and batch["text_pooled"].shape == (BATCH, 32)
        assert batch["boxes"].shape == (BATCH, 16, 4) and batch["tag_embeds"].shape == (BATCH, 16, 32)
        assert batch["category_ids"].dtype == torch.long and batch["image_ids"].shape == (BATCH,)
        mask, tmask = batch["box_mask"], batch["text_mask"]
        # Real tokens first, padding zero.
        n_tok = tmask.sum(1)
        assert torch.equal(tmask, torch.arange(77)[None] < n_tok[:, None]) and (n_tok > 2).all()
        assert (batch["text_tokens"][~tmask] == 0).all()
        boxes = batch["boxes"]
        assert (boxes[mask] >= 0).all() and (boxes[mask] <= 1).all()
        assert (boxes[mask][:, 2] > boxes[mask][:, 0]).all() and (boxes[mask][:, 3] > boxes[mask][:, 1]).all()
        assert (boxes[~mask] == 0).all() and (batch["category_ids"][~mask] == -1).all()
        assert (batch["tag_embeds"][~mask] == 0).all()
        for i, image_id in enumerate(batch["image_ids"].tolist()):
            lay = by_id[image_id]
            k = len(lay.boxes)
            assert mask[i].sum() == k and batch["category_ids"][i, :k].tolist() == lay.category_ids.tolist()
            for j, tag in enumerate(lay.tags):
                if tag in tag_embed:
                    assert torch.allclose(batch["tag_embeds"][i, j], tag_embed[tag], atol=1e-2)
            seen.append(image_id)
    assert sorted(seen) == sorted(by_id)  # one worker, whole dataset: each image exactly once


def test_flip_view_decodes_to_the_flipped_image_with_mirrored_boxes(env):
    tok, coco = PixelTokenizer(4), env["coco"]
    by_id = {lay.image_id: lay for lay in coco.layouts}
    views = set()
    for batch in ShardLoader(env["out"], "train2014", CFG, BATCH, seed=3):
        decoded = tok.decode(batch["latents"])  # (B, 3, 32, 32)
        for i, image_id in enumerate(batch["image_ids"].tolist()):
            lay = by_id[image_id]
            image = torch.from_numpy(coco.image(lay)).permute(2, 0, 1).float() / 127.5 - 1
            boxes = batch["boxes"][i, : len(lay.boxes)].numpy()
            if torch.allclose(decoded[i], image, atol=2e-3):
                views.add("image")
                np.testing.assert_allclose(boxes, lay.boxes, atol=1e-6)
            else:
                assert torch.allclose(decoded[i], image.flip(2), atol=2e-3)
                views.add("flip")
                np.testing.assert_allclose(boxes, flip_boxes(lay.boxes), atol=1e-6)
    assert views == {"image", "flip"}


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_reproduces_the_uninterrupted_order(env, workers):
    make = lambda: ShardLoader(env["out"], "train2014", CFG, BATCH, num_workers=workers, seed=7, shuffle_buffer=6)
    full = make()
    epoch0, epoch1 = _epoch(full), _epoch(full)
    assert len(epoch0) == len(epoch1) == len(full)
    assert [b["image_ids"].tolist() for b in epoch0] != [b["image_ids"].tolist() for b in epoch1]
    interrupted = make()
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 3
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a state survives a checkpoint round trip
    rest = _epoch(resumed)
    assert len(rest) == len(epoch0) - 3 and all(_same(a, b) for a, b in zip(rest, epoch0[3:], strict=True))
    assert all(_same(a, b) for a, b in zip(_epoch(resumed), epoch1, strict=True))  # then the next epoch


def test_ranks_get_disjoint_shards_and_equal_batch_counts(env):
    ranks = [ShardLoader(env["out"], "train2014", CFG, BATCH, rank=r, world_size=2, seed=1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    ids = [{i for b in _epoch(loader) for i in b["image_ids"].tolist()} for loader in ranks]
    assert not ids[0] & ids[1]
    with pytest.raises(ValueError, match="5 shards .* cannot feed 3 ranks x 2 workers"):
        ShardLoader(env["out"], "train2014", CFG, BATCH, rank=0, world_size=3, num_workers=2)
    a = _epoch(ShardLoader(env["out"], "train2014", CFG, BATCH, seed=1))
    b = _epoch(ShardLoader(env["out"], "train2014", CFG, BATCH, seed=2))
    assert [x["image_ids"].tolist() for x in a] != [x["image_ids"].tolist() for x in b]


def test_killed_worker_rerun_completes_without_duplicates(env, tmp_path):
    out = str(tmp_path / "out")
    first = _build(env, out, worker_rank=0, num_workers=2)
    assert first["built"] == ["train2014-000000", "train2014-000002", "train2014-000004"]
    _build(env, out, worker_rank=1, num_workers=2, stop_after=1)  # "killed" after one shard
    assert not read_manifest(out)["splits"]["train2014"]["complete"]
    with pytest.raises(ValueError, match="incomplete .* structmar build-shards"):
        ShardLoader(out, "train2014", CFG, BATCH)
    # What a kill leaves: a half-written temp file, and a renamed tar whose sidecar never got written.
    with open(os.path.join(out, "train2014-000003.tar.tmp-12345"), "wb") as f:
        f.write(b"half a tar")
    shutil.copy(os.path.join(out, "train2014-000001.tar"), os.path.join(out, "train2014-000003.tar"))
    again = _build(env, out, worker_rank=1, num_workers=2)
    assert again["built"] == ["train2014-000003"] and again["skipped"] == ["train2014-000001"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(env["out"]))
    assert verify_shards(out, "train2014") == dict(shards=5, samples=40, skipped_images=[])
    # Deterministic tars: the pieced-together set is byte-identical to an uninterrupted build.
    assert read_manifest(out)["splits"]["train2014"]["shards"] == read_manifest(env["out"])["splits"]["train2014"][
        "shards"]
    with pytest.raises(ValueError, match="samples_per_shard 8.*new --out"):
        build_shards(env["coco"], out, PixelTokenizer(4), env["text"], samples_per_shard=4, progress=False)


def test_missing_or_unreadable_images_are_skipped_listed_and_verified(env, tmp_path, capsys):
    """A deleted image file and a JPEG cut short: both left out of their shards, listed with their reason in the
    manifest and the summary line, and reported again by --verify."""
    import io

    from PIL import Image

    root = tmp_path / "coco"
    shutil.copytree(env["root"], root)
    images = root / "train2014"
    missing, cut = env["coco"].layouts[3], env["coco"].layouts[10]
    os.remove(images / missing.file_name)
    jpeg = io.BytesIO()
    Image.open(images / cut.file_name).save(jpeg, "JPEG")
    jpeg_name = cut.file_name.replace(".png", ".jpg")
    (images / jpeg_name).write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 4])  # cut in its scan data
    for kind in ("instances", "captions"):
        path = root / "annotations" / f"{kind}_train2014.json"
        tree = json.loads(path.read_text())
        next(i for i in tree["images"] if i["id"] == cut.image_id)["file_name"] = jpeg_name
        path.write_text(json.dumps(tree))
    out = str(tmp_path / "out")
    assert main(["build-shards", "--coco_root", str(root), "--coco_split", "train2014", "--out", out, "--tokenizer",
                 "pixel", "--clip_path", env["clip"], "--image_size", str(SIZE), "--samples_per_shard", str(PER_SHARD),
                 "--min_box_area", "0", "--device", "cpu", "--verify"]) == 0
    listed = (f"2 images skipped (1 missing, 1 unreadable): {missing.file_name} (missing); "
              f"{jpeg_name} (unreadable)")
    summary, verified = capsys.readouterr().out.splitlines()[-2:]
    assert summary.endswith(f"split train2014: 5/5 shards, 38 samples; {listed}"), summary
    assert verified == f"structmar: verified 5 shards, 38 samples; {listed}"
    skipped = read_manifest(out, "train2014")["splits"]["train2014"]["skipped_images"]
    assert [(s["image_id"], s["reason"]) for s in skipped] == [(missing.image_id, "missing"),
                                                               (cut.image_id, "unreadable")]
    assert "no such file" in skipped[0]["error"] and "truncated" in skipped[1]["error"]
    ids = {i for b in _epoch(ShardLoader(out, "train2014", CFG, 2, shuffle=False)) for i in b["image_ids"].tolist()}
    assert len(ids) == 38 and not ids & {missing.image_id, cut.image_id}


def test_corrupt_shard_raises_or_is_skipped_and_counted(env, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(env["out"], out)
    path = os.path.join(out, "train2014-000001.tar")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2 + 600])  # a cut inside a member, as a copy killed part-way leaves
    # The error names the shard and the member the cut fell in, also from a DataLoader worker (one line, no traceback).
    cut = (r"train2014-000001.tar: corrupt or truncated tar after sample \d{12} "
           r"\((tar header after )?member \d{12}\.\w+\.\w+ cut short\)$")
    for workers in (0, 1):
        with pytest.raises(ShardError, match=cut):
            _epoch(ShardLoader(out, "train2014", CFG, BATCH, num_workers=workers, shuffle=False))
    with pytest.raises(ValueError, match="train2014-000001.tar: sha256 differs"):
        verify_shards(out, "train2014")
    # skip: the samples before the cut are used, the rest of the shard is dropped and counted by sample.
    loader = ShardLoader(out, "train2014", CFG, BATCH, on_error="skip", max_bad_fraction=1.0, shuffle=False)
    batches = _epoch(loader)
    seen = {i for b in batches for i in b["image_ids"].tolist()}
    shard1 = [int(r["__key__"]) for r in iter_shard(os.path.join(env["out"], "train2014-000001.tar"))]
    assert len(batches) == len(loader) and 0 < len(set(shard1) & seen) < PER_SHARD
    assert loader.skipped == {"corrupt": PER_SHARD - len(set(shard1) & seen)}
    # More than --max_bad_fraction of the epoch bad: one line naming the shard.
    with pytest.raises(ShardError, match=r"more than 0.1 of rank 0's epoch 0 is bad data .* in 1 shards: "
                                         r"train2014-000001.tar; rerun build-shards"):
        _epoch(ShardLoader(out, "train2014", CFG, BATCH, on_error="skip", max_bad_fraction=0.1, num_workers=1))


def test_bad_samples_name_shard_and_sample(env, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(env["out"], out)
    path = os.path.join(out, "train2014-000000.tar")
    raws = list(iter_shard(path))
    for r in raws:
        r.pop("__shard__")

    def meta(r, **change):
        m = json.loads(r["layout.json"])
        m.update(change)
        r["layout.json"] = json.dumps(m).encode()

    moments = np.load(__import__("io").BytesIO(raws[0]["moments.npy"])).copy()
    moments[0, 0, 0, 0] = np.nan
    raws[0]["moments.npy"] = _npy(moments)
    m1 = json.loads(raws[1]["layout.json"])
    meta(raws[1], boxes=[[b[2], b[1], b[0], b[3]] for b in m1["boxes"]])  # inverted
    meta(raws[2], category_ids=[99] * len(json.loads(raws[2]["layout.json"])["category_ids"]))
    del raws[3]["tags.npy"]
    meta(raws[4], boxes=[], category_ids=[], tags=[])
    raws[4]["tags.npy"] = _npy(np.zeros((0, 32), np.float16))
    m5 = json.loads(raws[5]["layout.json"])
    meta(raws[5], boxes=[[b[0], b[1], b[2] + 1.5, b[3]] for b in m5["boxes"]])  # out of range
    write_shard(path, raws)
    schema = _schema(read_manifest(out))
    reasons = []
    for r in raws[:6]:
        with pytest.raises(ShardError) as e:
            decode_sample(r, schema)
        reasons.append(e.value.reason)
    assert reasons == ["nonfinite", "bad_box", "unknown_category", "missing_payload", "empty_layout", "bad_box"]
    key = raws[0]["__key__"]
    with pytest.raises(ShardError, match=f"shard train2014-000000.tar, sample {key}: NaN or inf in moments"):
        _epoch(ShardLoader(out, "train2014", CFG, BATCH, shuffle=False))
    loader = ShardLoader(out, "train2014", CFG, BATCH, on_error="skip", max_bad_fraction=1.0)
    batches = _epoch(loader)
    assert len(batches) == len(loader)
    # Counted per encounter: the short share is topped up by a second pass, which meets some bad samples again.
    expected = {"nonfinite": 1, "bad_box": 2, "unknown_category": 1, "missing_payload": 1, "empty_layout": 1}
    assert set(loader.skipped) == set(expected) and all(loader.skipped[k] >= n for k, n in expected.items())
    bad_ids = {int(r["__key__"]) for r in raws[:6]}
    assert not bad_ids & {i for b in batches for i in b["image_ids"].tolist()}
    # Resuming mid-epoch in skip mode replays which samples were bad: the same batches follow.
    resumed = ShardLoader(out, "train2014", CFG, BATCH, on_error="skip", max_bad_fraction=1.0)
    resumed.load_state_dict({"epoch": 0, "batches": 4})
    assert all(_same(a, b) for a, b in zip(_epoch(resumed), batches[4:], strict=True))


def _npy(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("override, field", [
    (dict(image_size=64), "image_size 32 .* 64"),
    (dict(tokenizer="kl16", image_size=32), "tokenizer 'pixel'"),
    (dict(text_dim=512), "text_dim 32"),
    (dict(pixel_patch=8), r"latent shape .*\(48, 8, 8\).*\(192, 4, 4\)"),
])
def test_manifest_mismatch_names_the_field(env, override, field):
    cfg = model_config("tiny", **dict(dict(image_size=SIZE, text_dim=32), **override))
    with pytest.raises(ValueError, match=field):
        ShardLoader(env["out"], "train2014", cfg, BATCH)


def test_missing_shards_print_the_build_command(tmp_path, env):
    with pytest.raises(FileNotFoundError, match="structmar build-shards .*--coco_split val2014 .*--image_size 32"):
        ShardLoader(str(tmp_path / "none"), "val2014", CFG, BATCH)
    with pytest.raises(FileNotFoundError, match="no split 'val2014'.*structmar build-shards"):
        ShardLoader(env["out"], "val2014", CFG, BATCH)


def test_cli_builds_a_second_split_and_reruns_as_a_no_op(env, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(env["out"], out)
    args = ["build-shards", "--coco_root", env["root"], "--coco_split", "val2014", "--out", out, "--tokenizer",
            "pixel", "--clip_path", env["clip"], "--image_size", str(SIZE), "--samples_per_shard", "4",
            "--min_box_area", "0", "--device", "cpu", "--verify"]
    assert main(args) == 0
    assert "verified 2 shards, 8 samples" in capsys.readouterr().out
    mtime = os.path.getmtime(os.path.join(out, "val2014-000000.tar"))
    assert main(args) == 0 and os.path.getmtime(os.path.join(out, "val2014-000000.tar")) == mtime
    assert set(read_manifest(out)["splits"]) == {"train2014", "val2014"}
    assert len(ShardLoader(out, "val2014", CFG, 2)) == 4
    assert main(args[:-1] + ["--clip_path", str(tmp_path / "noclip")]) == 2
    assert "noclip not found" in capsys.readouterr().err


def test_kl16_shards_hold_image_and_flip_moments(env, tmp_path):
    vae = str(tmp_path / "kl16.ckpt")
    write_random_kl16(vae, seed=0, ch=32)
    tok = KLTokenizer.from_checkpoint(vae)
    out = str(tmp_path / "out")
    build_shards(env["coco"], out, tok, env["text"], samples_per_shard=PER_SHARD, batch_size=16, progress=False)
    raw = next(iter_shard(os.path.join(out, "train2014-000000.tar")))
    moments = decode_sample(raw, _schema(read_manifest(out)))["moments"]
    image = torch.from_numpy(env["coco"].image(env["coco"].layouts[0])).permute(2, 0, 1)[None].float() / 127.5 - 1
    expect = torch.cat([tok.encode(image), tok.encode(image.flip(3))]).numpy()  # (2, 32, 2, 2)
    np.testing.assert_allclose(moments, expect, atol=2e-3, rtol=1e-2)
    cfg = model_config("tiny", tokenizer="kl16", image_size=SIZE, text_dim=32)
    batch = next(iter(ShardLoader(out, "train2014", cfg, BATCH)))
    assert batch["latents"].shape == (BATCH, 16, 2, 2)


def test_builder_slots_come_from_flags_or_the_distributed_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _resolve_slots(1, None) == ([0], 1)
    assert _resolve_slots(3, None) == ([0, 1, 2], 3)
    assert _resolve_slots(4, 2) == ([2], 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _resolve_slots(1, None) == ([1], 2)
    assert _resolve_slots(2, None) == ([2, 3], 4)  # 2 nodes x 2 local processes


@pytest.mark.slow
def test_cli_spawns_local_builder_processes(env, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["build-shards", "--coco_root", env["root"], "--coco_split", "train2014", "--out", out, "--tokenizer",
            "pixel", "--clip_path", env["clip"], "--image_size", str(SIZE), "--samples_per_shard", str(PER_SHARD),
            "--min_box_area", "0", "--device", "cpu", "--num_workers", "2", "--verify"]
    assert main(args) == 0
    assert "verified 5 shards, 40 samples" in capsys.readouterr().out
    assert read_manifest(out)["splits"]["train2014"]["shards"] == read_manifest(env["out"])["splits"]["train2014"][
        "shards"]


def test_resume_with_another_layout_is_refused_or_warned(env):
    loader = ShardLoader(env["out"], "train2014", CFG, BATCH, seed=0)
    state = dict(loader.state_dict(), batches=3)
    other = ShardLoader(env["out"], "train2014", CFG, BATCH, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="saved with world_size 1, this loader has 2"):
        other.load_state_dict(state, strict=True)
    with pytest.warns(UserWarning, match="world_size 1, this loader has 2"):
        other.load_state_dict(state)
    assert other.state_dict()["batches"] == 3 and len(_epoch(other)) == 2
    with pytest.raises(ValueError, match="position 7 is outside this epoch's 5 batches"):
        other.load_state_dict({"epoch": 0, "batches": 7})
