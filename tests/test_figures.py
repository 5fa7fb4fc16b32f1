import numpy as np
import pytest
import torch

from structmar.figures import draw_layout, image_grid


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
