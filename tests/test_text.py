import json
import os

import pytest
import torch

from structmar.text import TextEncoder, write_random_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_random_clip(str(tmp_path_factory.mktemp("clip") / "clip-tiny"), seed=0, size="tiny")


def test_offline_directory_format(clip_dir):
    with open(os.path.join(clip_dir, "merges.txt")) as f:
        assert f.read().strip() == "#version: 0.2"
    with open(os.path.join(clip_dir, "vocab.json")) as f:
        vocab = json.load(f)
    assert len(vocab) == 2 * 256 + 2 and "a</w>" in vocab and "<|endoftext|>" in vocab
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(clip_dir))


def test_encode_shapes_mask_and_pooled(clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder.from_pretrained(clip_dir)
    assert enc.dim == 32 and enc.max_length == 77
    tokens, mask, pooled = enc.encode(["a red circle", "hi"])
    # Offline vocabulary: one token per character of each word, plus start and end of text.
    assert mask.sum(1).tolist() == [len("aredcircle") + 2, len("hi") + 2]
    assert tokens.shape == (2, 12, 32) and mask.dtype == torch.bool and pooled.shape == (2, 32)
    assert mask[1].tolist() == [True] * 4 + [False] * 8  # right padding: the mask is a prefix
    # Pooled = the final-layer-normed state at the end-of-text token.
    assert torch.allclose(pooled[1], tokens[1, 3], atol=1e-6)
    # Causal attention: a caption's real tokens do not depend on the batch's padding length.
    alone = enc.encode(["hi"])[0]
    assert torch.allclose(alone[0], tokens[1, :4], atol=1e-5)


def test_encode_tags_and_determinism(clip_dir):
    enc = TextEncoder.from_pretrained(clip_dir)
    tags = enc.encode_tags(["red circle", "a dog on a skateboard", "red circle"])
    assert tags.shape == (3, 32) and torch.equal(tags[0], tags[2]) and not torch.equal(tags[0], tags[1])
    assert enc.encode_tags([]).shape == (0, 32)
    again = write_random_clip(clip_dir + "-again", seed=0)
    assert torch.allclose(TextEncoder.from_pretrained(again).encode_tags(["red circle"])[0], tags[0], atol=1e-5)


def test_long_captions_truncate_to_77(clip_dir):
    tokens, mask, _ = TextEncoder.from_pretrained(clip_dir).encode(["x" * 200])
    assert tokens.shape[1] == 77 and mask.all()


def test_missing_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*huggingface-cli download openai/clip-vit-base-patch32"):
        TextEncoder.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*incomplete"):
        TextEncoder.from_pretrained(str(tmp_path / "empty"))


def test_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP size"):
        write_random_clip(str(tmp_path / "c"), size="huge")


def test_word_merges_make_known_words_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    write_random_clip(str(tmp_path / "plain"), seed=0, size="tiny")
    write_random_clip(str(tmp_path / "words"), seed=0, size="tiny", words={"circle", "red", "triangle", "reed"})
    plain = CLIPTokenizer.from_pretrained(str(tmp_path / "plain"), local_files_only=True)
    words = CLIPTokenizer.from_pretrained(str(tmp_path / "words"), local_files_only=True)
    caption = "a red circle above a triangle"
    assert words.tokenize(caption) == ["a</w>", "red</w>", "circle</w>", *plain.tokenize("above"), "a</w>",
                                       "triangle</w>"]
    assert len(plain.tokenize(caption)) == len(caption.replace(" ", ""))  # symbol by symbol
    assert "".join(words.tokenize("a purple hexagon")).replace("</w>", "") == "apurplehexagon"  # still spelled
    encoder = TextEncoder.from_pretrained(str(tmp_path / "words"))
    tokens, mask, pooled = encoder.encode([caption])
    assert mask.sum() == 6 + 2 + len(plain.tokenize("above")) - 1  # start and end tokens around the words


def test_centring_fits_the_final_norm_to_the_given_texts(clip_dir, tmp_path):
    tags = ["red circle", "blue circle", "red square", "green triangle", "yellow square"]
    plain = TextEncoder.from_pretrained(clip_dir)
    path = write_random_clip(str(tmp_path / "centred"), seed=0, size="tiny", centre_on=tags + tags[:2])
    centred = TextEncoder.from_pretrained(path)  # the fit is in the saved weights, in CLIP's format
    before, after = plain.encode_tags(tags), centred.encode_tags(tags)
    assert torch.allclose(after.mean(0), torch.zeros(32), atol=1e-4)
    assert after.std(0).mean().item() == pytest.approx(1.0, abs=1e-4)
    # one shift and one scale of the pooled features: everything else of the random model is unchanged
    scale = before.std(0).mean() / after.std(0).mean()
    assert torch.allclose(after * scale, before - before.mean(0), atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(after[0], after[1], dim=0)
    assert cosine < torch.nn.functional.cosine_similarity(before[0], before[1], dim=0)
    with pytest.raises(ValueError, match="at least 2 distinct texts"):
        write_random_clip(str(tmp_path / "one"), seed=0, size="tiny", centre_on=["red circle"] * 3)


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    path = tmp_path / "clip"
    path.mkdir()
    (path / "config.json").write_text("{}")  # what a write killed before its weights used to leave

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(CLIPTextModel, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            write_random_clip(str(path), seed=0, size="tiny")
    assert sorted(os.listdir(tmp_path)) == ["clip"]  # no temp directory left behind
    write_random_clip(str(path), seed=0, size="tiny")  # the rerun replaces the leftover with a whole model
    assert sorted(os.listdir(tmp_path)) == ["clip"]
    assert TextEncoder.from_pretrained(str(path)).encode(["a red circle"])[2].shape == (1, 32)
