"""Every kind of file a user hands structmar, truncated, empty, swapped for another kind (and, for pickles, carrying
code), through the entry points that open it: one line naming the file and what is wrong, never a traceback."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from structmar.cli import main
from structmar.config import model_config
from structmar.files import load_torch_pickle, sniff
from structmar.model import StructMAR, write_export
from structmar.reward import load_detector
from structmar.shard_tar import iter_shard, write_shard
from structmar.text import TextEncoder, write_random_clip
from structmar.tokenizer import build_tokenizer, write_random_kl16

SPEC = {"caption": "a red circle", "boxes": [{"box": [0.1, 0.1, 0.5, 0.5], "tag": "red circle"}]}


class RunsCode:
    """Pickles as a call of os.system: loading it unguarded would run a shell command."""

    def __reduce__(self):
        return os.system, ("echo this should never run",)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One intact file of each kind (a CLIP directory for the directory kinds)."""
    d = tmp_path_factory.mktemp("good")
    cfg = model_config("tiny", text_dim=32, num_sampling_steps=4)
    state = StructMAR(cfg).state_dict()
    write_export(str(d / "export.safetensors"), state, state, cfg)
    torch.save({"model": state}, d / "mar.pth")
    write_random_kl16(str(d / "kl16.ckpt"), ch=32)
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, d / "frcnn.pth")
    write_random_clip(str(d / "clip"), seed=0, size="tiny")
    (d / "layout.json").write_text(json.dumps(SPEC))
    os.makedirs(d / "shards")
    (d / "shards" / "manifest.json").write_text(json.dumps({"format": "structmar-shards-v1", "splits": {}}))
    write_shard(str(d / "shard.tar"), [{"__key__": f"{i:012d}", "layout.json": b"{}", "text.npy": bytes(5000)}
                                         for i in range(3)])
    return d


def _cli(*argv):
    """A CLI call's error line; the command must fail with exit code 2 and print nothing but progress before it."""
    return lambda capsys: _cli_error(capsys, main(list(argv)))


def _cli_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("structmar: error: "), err[-3:]
    return err[-1]


def _call(fn):
    """A library loader's one-line ValueError."""
    def run(capsys):
        with pytest.raises(ValueError) as e:
            fn()
        return str(e.value)
    return run


# kind -> (the file in `good` to damage, where the damaged copy goes (relative to a fresh directory),
#          how to open it (given the damaged copy's path and `good`), the file of another kind to swap in)
KINDS = {
    "export": ("export.safetensors", "run/checkpoint-last.safetensors",
               lambda p, g: _cli("sample", "--checkpoint", os.path.dirname(p), "--layout", str(g / "layout.json"),
                                 "--out", os.path.join(os.path.dirname(p), "out"), "--device", "cpu"),
               "mar.pth"),
    "mar_weights": ("mar.pth", "mar.pth",
                    lambda p, g: _cli("train", "--output_dir", os.path.join(os.path.dirname(p), "run"), "--resume", p,
                                      "--device", "cpu", "--data", str(g / "shards")),
                    "export.safetensors"),
    "kl16": ("kl16.ckpt", "kl16.ckpt", lambda p, g: _call(lambda: build_tokenizer("kl16", vae_path=p)),
             "export.safetensors"),
    "detector": ("frcnn.pth", "frcnn.pth",
                 lambda p, g: _call(lambda: load_detector("torchvision_frcnn", p, {1: "person"})),
                 "layout.json"),
    "clip_weights": ("clip/model.safetensors", "clip/model.safetensors",
                     lambda p, g: _call(lambda: TextEncoder.from_pretrained(os.path.dirname(p))), "mar.pth"),
    "clip_config": ("clip/config.json", "clip/config.json",
                    lambda p, g: _call(lambda: TextEncoder.from_pretrained(os.path.dirname(p))),
                    "export.safetensors"),
    "hf_detector_config": ("clip/config.json", "detr/config.json",
                           lambda p, g: _call(lambda: load_detector("hf", os.path.dirname(p), {1: "person"})),
                           "kl16.ckpt"),
    "layout_spec": ("layout.json", "layout.json",
                    lambda p, g: _cli("sample", "--checkpoint", str(g / "export.safetensors"), "--layout", p,
                                      "--out", os.path.join(os.path.dirname(p), "out")),
                    "export.safetensors"),
    "manifest": ("shards/manifest.json", "shards/manifest.json",
                 lambda p, g: _cli("train", "--output_dir", os.path.join(os.path.dirname(p), "run"), "--model",
                                   "tiny", "--device", "cpu", "--data", os.path.dirname(p)),
                 "mar.pth"),
    "shard": ("shard.tar", "train2014-000000.tar", lambda p, g: _call(lambda: list(iter_shard(p, 3))),
              "layout.json"),
}


def _damaged(good, tmp_path, kind, damage):
    source, target, _, swap = KINDS[kind]
    where = tmp_path / target
    if os.path.dirname(source):  # a file inside a directory: copy the whole directory, then damage the file
        shutil.copytree(good / os.path.dirname(source), where.parent)
    where.parent.mkdir(parents=True, exist_ok=True)
    data = (good / source).read_bytes()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "swapped":
        data = (good / swap).read_bytes()
    where.write_bytes(data)
    return str(where)


WORDS = {"truncated": ("truncated", "cut short", "not valid JSON"), "empty": ("empty", "0 bytes"),
         "swapped": (" is a", " is JSON text", " is binary", "not JSON")}


@pytest.mark.parametrize("damage", ["truncated", "empty", "swapped"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_damaged_file_is_one_line_naming_it(good, tmp_path, capsys, kind, damage):
    path = _damaged(good, tmp_path, kind, damage)
    message = KINDS[kind][2](path, good)(capsys)
    named = path if kind != "shard" else os.path.basename(path)  # a shard is named as the manifest lists it
    assert "\n" not in message and named in message, message
    assert any(w in message for w in WORDS[damage]), message
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["export", "mar_weights", "kl16", "detector"])
def test_a_pickle_that_would_run_code_is_refused_naming_the_call(good, tmp_path, capsys, kind):
    """Each file torch.load opens (a .pth weights file named .safetensors too: refused as another format)."""
    _, target, open_, _ = KINDS[kind]
    path = tmp_path / target
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": RunsCode()}, path)
    message = open_(str(path), good)(capsys)
    assert "\n" not in message and str(path) in message, message
    if kind == "export":
        assert "is a torch.save zip archive, not a safetensors file" in message
    else:
        assert "holds a pickled posix.system, code that loading it would run; refused" in message


def test_sniff_tells_the_formats_apart(good, tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "t.safetensors"))
    (tmp_path / "empty").write_bytes(b"")
    assert [sniff(str(p)) for p in (tmp_path / "t.safetensors", good / "mar.pth", good / "shard.tar",
                                    good / "layout.json", tmp_path / "empty")] == [
        "a safetensors file", "a torch.save zip archive", "a tar archive", "JSON text", "empty"]
    torch.save({"a": torch.ones(3)}, tmp_path / "ok.pth")
    assert load_torch_pickle(str(tmp_path / "ok.pth"), "test file")["a"].tolist() == [1.0, 1.0, 1.0]
