import numpy as np
import pytest
import torch

from structmar.metrics import ClipScorer, FIDInception, frechet_distance, inception_features, layout_scores
from structmar.shapes import CATEGORY_BY_ID
from structmar.text import write_random_clip


def shapes_categories() -> dict[int, str]:
    return {cid: c.name for cid, c in CATEGORY_BY_ID.items()}


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


def test_ap_bootstrap_standard_error():
    from structmar.reward import layout_metrics

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
