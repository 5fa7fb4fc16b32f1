import pytest
import torch

from structmar.tokenizer import (
    KLTokenizer,
    PixelTokenizer,
    build_tokenizer,
    latent_scale,
    latent_shape,
    sample_posterior,
    write_random_kl16,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, OpenMP threads spinning against other jobs cost 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pixel_round_trip_and_moments():
    tok = PixelTokenizer(4)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    moments = tok.encode(images)
    assert moments.shape == (2, 2 * 48, 4, 4)
    assert torch.all(moments[:, 48:] == moments[0, 48, 0, 0]) and moments[0, 48, 0, 0] < -20
    # Token (gy, gx) holds exactly the pixels of patch (gy, gx).
    assert torch.equal(moments[1, :48, 2, 3].reshape(3, 4, 4), images[1, :, 8:12, 12:16])
    latents = sample_posterior(moments, tok.scale, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 48, 4, 4)
    assert torch.allclose(tok.decode(latents), images, atol=1e-5)
    assert (tok.id, tok.channels, tok.stride, tok.scale) == ("pixel-p4", 48, 4, 1.0)


def test_sample_posterior_statistics_and_determinism():
    mean, logvar = torch.full((1, 2, 64, 64), 3.0), torch.full((1, 2, 64, 64), 2 * torch.log(torch.tensor(0.5)))
    moments = torch.cat([mean, logvar], 1).half()  # shards store fp16 moments
    a = sample_posterior(moments, 0.2325, torch.Generator().manual_seed(1))
    b = sample_posterior(moments, 0.2325, torch.Generator().manual_seed(1))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert abs(a.mean().item() / 0.2325 - 3.0) < 0.02
    assert abs(a.std().item() / 0.2325 - 0.5) < 0.02


def test_latent_scale_lives_here():
    assert latent_scale("kl16") == 0.2325 and latent_scale("pixel") == 1.0
    assert latent_shape("kl16", 256) == (16, 16, 16)
    assert latent_shape("pixel", 32, 4) == (48, 8, 8)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        latent_scale("vq")


def test_kl16_layout_matches_mar_checkpoint_keys():
    keys = set(KLTokenizer(ch=32).state_dict())
    assert len(keys) == 312  # MAR's AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)) has 312 entries
    # Encoder attention at 16x16 (the last of five levels at 256 px) and in the middle block only.
    assert "encoder.down.4.attn.1.proj_out.weight" in keys
    assert not any(k.startswith(f"encoder.down.{i}.attn") for k in keys for i in range(4))
    assert "encoder.mid.attn_1.q.weight" in keys and "decoder.mid.attn_1.k.weight" in keys
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in keys)
    assert "decoder.up.0.block.2.conv2.weight" in keys and "decoder.up.4.upsample.conv.weight" in keys
    assert "encoder.down.3.downsample.conv.weight" in keys and "encoder.down.4.downsample.conv.weight" not in keys
    assert {"quant_conv.weight", "post_quant_conv.weight", "encoder.down.2.block.0.nin_shortcut.weight"} <= keys
    assert "encoder.down.1.block.0.nin_shortcut.weight" not in keys


def test_kl16_checkpoint_round_trip(tmp_path, capsys):
    path = str(tmp_path / "kl16.ckpt")
    write_random_kl16(path, seed=3, ch=32, extra_loss_keys=True)
    saved = torch.load(path, weights_only=True)["model"]
    tok = build_tokenizer("kl16", vae_path=path)
    assert "skipped 2 training-only keys" in capsys.readouterr().out
    assert tok.load_report["skipped"] == ["loss.discriminator.main.0.weight", "loss.logvar"]
    for k, v in tok.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert (tok.channels, tok.stride, tok.scale, tok.id) == (16, 16, 0.2325, "kl16-ch32")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = tok.encode(images)
    assert moments.shape == (2, 32, 2, 2) and torch.isfinite(moments).all()
    out = tok.decode(sample_posterior(moments, tok.scale))
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    # Deterministic encoder: the same weights give the same moments.
    assert torch.equal(moments, build_tokenizer("kl16", vae_path=path).encode(images))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("quant_conv.weight"), "missing keys.*quant_conv.weight"),
    (lambda sd: sd.pop("decoder.mid.attn_1.q.bias"), "missing keys.*decoder.mid.attn_1.q.bias"),
    (lambda sd: sd.__setitem__("encoder.extra.weight", torch.zeros(1)), "unexpected keys.*encoder.extra.weight"),
    (lambda sd: sd.__setitem__("post_quant_conv.bias", torch.zeros(3)), "shape mismatches.*post_quant_conv.bias"),
])
def test_kl16_mismatch_is_reported(tmp_path, edit, message):
    path = str(tmp_path / "kl16.ckpt")
    write_random_kl16(path, ch=32)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["model"])
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=message):
        build_tokenizer("kl16", vae_path=path)


def test_kl16_bad_files(tmp_path):
    with pytest.raises(ValueError, match="--vae_path"):
        build_tokenizer("kl16")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        build_tokenizer("kl16", vae_path=str(tmp_path / "nope.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="'model' entry"):
        build_tokenizer("kl16", vae_path=str(tmp_path / "other.ckpt"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("vqgan")
