import os

import pytest
import torch

from structmar import atomic


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    path = str(tmp_path / "state.json")
    atomic.write_text(path, "old")

    def dies_midway(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt  # a kill between the first bytes and the rename

    with pytest.raises(KeyboardInterrupt):
        atomic.write_with(path, dies_midway)
    assert (tmp_path / "state.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]

    atomic.write_bytes(path, b"new")
    assert (tmp_path / "state.json").read_bytes() == b"new"
    atomic.torch_save({"w": torch.arange(3)}, str(tmp_path / "t.pt"))
    assert torch.load(tmp_path / "t.pt", weights_only=True)["w"].tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["state.json", "t.pt"]


def test_a_library_that_writes_to_a_path_publishes_only_complete_files(tmp_path):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "w.safetensors")
    atomic.write_path(path, lambda tmp: save_file({"w": torch.ones(2)}, tmp))

    def dies_after_writing(tmp):
        save_file({"w": torch.zeros(2)}, tmp)
        raise KeyboardInterrupt  # killed after the library wrote, before the rename

    with pytest.raises(KeyboardInterrupt):
        atomic.write_path(path, dies_after_writing)
    assert load_file(path)["w"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_an_image_is_saved_in_the_format_its_extension_names(tmp_path):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    atomic.save_image(Image.fromarray(pixels), str(tmp_path / "a.png"))
    atomic.save_image(Image.fromarray(pixels), str(tmp_path / "a.jpg"))
    with Image.open(tmp_path / "a.png") as png, Image.open(tmp_path / "a.jpg") as jpg:
        assert (png.format, jpg.format) == ("PNG", "JPEG")
        assert np.array_equal(np.asarray(png), pixels)  # PNG is lossless
    with pytest.raises(ValueError, match="a.imgx"):
        atomic.save_image(Image.fromarray(pixels), str(tmp_path / "a.imgx"))
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png"]


def test_a_write_removes_the_temp_files_killed_writers_of_that_path_left(tmp_path):
    (tmp_path / "state.json.tmp-4242").write_bytes(b"half of a write killed by SIGKILL")
    (tmp_path / "other.json.tmp-4242").write_bytes(b"another path's")
    atomic.write_text(str(tmp_path / "state.json"), "new")
    assert sorted(os.listdir(tmp_path)) == ["other.json.tmp-4242", "state.json"]
