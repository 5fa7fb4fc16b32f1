"""2D RoPE, the layout-guided bias and the attention backends (CPU)."""

import math

import pytest
import torch

from structmar.attention import (
    BOX,
    IMAGE,
    NULL,
    PAD,
    TEXT,
    LayoutBias,
    TokenTable,
    apply_rope,
    cell_ranges,
    flex_attention,
    rope_table,
    sdpa_attention,
    select_attention,
)

G = 4  # grid side of the hand-built tables


def make_table(boxes, num_null=1, batch=1):
    """[text, box..., null...] + a G x G image, the boxes as normalised xyxy lists."""
    n_buf = 1 + len(boxes) + num_null
    kind = [TEXT] + [BOX] * len(boxes) + [NULL] * num_null + [IMAGE] * G * G
    cells = list(range(G * G))
    cell = [G * G] * n_buf + cells
    row = [0] * n_buf + [c // G for c in cells]
    col = [0] * n_buf + [c % G for c in cells]
    ranges = cell_ranges(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), G).tolist()
    box = [[0] * 4] + ranges + [[0] * 4] * (num_null + G * G)
    as_t = lambda v: torch.tensor(v).expand(batch, -1).clone()
    box_t = torch.tensor(box).expand(batch, -1, -1)
    return TokenTable(as_t(kind), as_t(cell), as_t(row), as_t(col), *box_t.unbind(-1))


def attention_weights(bias: LayoutBias, lam=None, heads=2):
    """Attention probabilities of random q/k under `bias`, read out with identity values."""
    B, N = bias.table.kind.shape
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, B, heads, N, 8, generator=g)
    v = torch.eye(N).expand(B, heads, N, N)
    return sdpa_attention(q, k, v, bias=bias, lam=lam)


def test_rope_scores_depend_only_on_offsets():
    sin, cos = rope_table(8, 16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g)

    def score(cq, ck):
        idx = torch.tensor([[cq, ck]])
        rq = apply_rope(q, sin[idx[:, :1]], cos[idx[:, :1]])
        rk = apply_rope(k, sin[idx[:, 1:]], cos[idx[:, 1:]])
        return (rq * rk).sum()

    cell = lambda r, c: r * 8 + c
    base = score(cell(1, 2), cell(3, 1))
    assert torch.allclose(base, score(cell(4, 5), cell(6, 4)), atol=1e-5)  # shift by (3, 3)
    assert torch.allclose(base, score(cell(2, 2), cell(4, 1)), atol=1e-5)  # shift by (1, 0)
    assert not torch.allclose(base, score(cell(1, 2), cell(1, 3)), atol=1e-3)  # another offset
    # rows and columns rotate different halves: a pure row shift is not a column shift
    assert not torch.allclose(score(cell(0, 0), cell(1, 0)), score(cell(0, 0), cell(0, 1)), atol=1e-3)
    # the extra identity row leaves buffer tokens unrotated
    assert torch.equal(apply_rope(q, sin[64].expand(1, 1, 16), cos[64].expand(1, 1, 16)), q)


def test_cell_ranges_cover_overlapping_cells():
    r = cell_ranges(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.30, 0.30, 0.31, 0.31], [0.6, 0.1, 1.0, 0.26]]), 4)
    assert r.tolist() == [[0, 0, 2, 2], [1, 1, 2, 2], [2, 0, 4, 2]]


def test_hard_bias_zero_outside_boxes():
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]]
    table = make_table(boxes)
    w = attention_weights(LayoutBias(table, mode="hard"))[0]  # (H, N, N)
    assert torch.isfinite(w).all()
    n_buf = 4
    for i in range(G * G):
        r, c = divmod(i, G)
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            inside = x0 * G <= c < x1 * G and y0 * G <= r < y1 * G
            to_box = w[:, n_buf + i, 1 + j]
            assert (to_box > 0).all() if inside else (to_box == 0).all(), (i, j)
        assert (w[:, n_buf + i, 0] > 0).all() and (w[:, n_buf + i, 3] > 0).all()  # text and null stay open
    # layout -> image follows the box too; the box token still sees the buffer
    box0_to_image = w[:, 1, n_buf:].reshape(-1, G, G)
    assert (box0_to_image[:, :2, :2] > 0).all() and box0_to_image[:, 2:].eq(0).all()
    w_open = attention_weights(LayoutBias(table, mode="hard", layout_to_image="open"))[0]
    assert (w_open[:, 1, n_buf:] > 0).all()


def test_hard_bias_rows_never_empty():
    # a box covering no kept image token: its row still has the buffer, no NaN
    table = make_table([[0.0, 0.0, 0.25, 0.25]])
    keep = torch.tensor([[0, 1, 2] + list(range(8, 3 + G * G))])  # drops the box's only cell (index 3)
    w = attention_weights(LayoutBias(table.gather(keep), mode="hard", penalise_text=True, penalise_null=True))
    assert torch.isfinite(w).all()
    assert torch.allclose(w.sum(-1), torch.ones(()))


def test_soft_bias_is_minus_lambda_outside():
    table = make_table([[0.0, 0.0, 0.5, 0.5]], num_null=0)
    lam = torch.tensor([0.0, 1.5])
    N = table.kind.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, N, 8, generator=g)
    dense = LayoutBias(table, mode="soft").dense(lam, torch.float32)  # (1, H, N, N)
    inside_q, outside_q = 2 + 0, 2 + 3  # image cells (0, 0) and (0, 3)
    assert dense[0, :, inside_q, 1].eq(0).all()
    assert dense[0, :, outside_q, 1].tolist() == [0.0, -1.5]
    assert dense[0, :, outside_q, 2:].eq(0).all()  # image-image is never biased
    w = sdpa_attention(q, k, torch.eye(N).expand(1, 2, N, N), bias=LayoutBias(table), lam=lam)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    ratio = (w[0, 1, outside_q, 1] / w[0, 1, outside_q, 2]) / (plain[0, 1, outside_q, 1] / plain[0, 1, outside_q, 2])
    assert torch.allclose(ratio, torch.exp(torch.tensor(-1.5)), atol=1e-5)


def test_bonus_raises_only_the_covering_layout_tokens():
    table = make_table([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 1.0, 0.5]], num_null=1)
    inside_both, inside_second, below = 4 + 1, 4 + 3, 4 + 8  # image cells (0, 1), (0, 3), (2, 0)
    for mode, lam in (("soft", torch.tensor([0.0, 1.5])), ("hard", None)):
        plain = LayoutBias(table, mode=mode).dense(lam, torch.float32)
        raised = LayoutBias(table, mode=mode, bonus=3.0).dense(lam, torch.float32)
        assert raised.isinf().equal(plain.isinf())  # the bonus never lifts a hard -inf
        delta = (raised - plain).nan_to_num(0.0)
        assert delta.unique().tolist() == [0.0, 3.0]
        assert (delta[0, :, inside_both, 1:3] == 3.0).all()
        assert (delta[0, :, inside_second, 1:3] == torch.tensor([0.0, 3.0])).all()
        assert (delta[0, :, below] == 0).all()  # no box covers it
        assert (delta[0, :, :4] == 0).all()  # buffer queries are never raised
    # with a fixed bonus a covering layout token gets exp(bonus) times its unbiased weight relative to the image keys
    N = table.kind.shape[1]
    q, k = torch.randn(2, 1, 2, N, 8, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(N).expand(1, 2, N, N)
    w = sdpa_attention(q, k, eye, bias=LayoutBias(table, mode="hard", bonus=3.0))
    w0 = sdpa_attention(q, k, eye, bias=LayoutBias(table, mode="hard"))
    odds = lambda weights: weights[0, :, inside_second, 2] / weights[0, :, inside_second, 6]  # layout token 2 : cell 2
    ratio = odds(w) / odds(w0)
    assert torch.allclose(ratio, torch.exp(torch.tensor(3.0)), atol=1e-5)


def test_pad_tokens_are_excluded():
    table = make_table([[0.0, 0.0, 0.5, 0.5]]).pad(30)
    assert table.kind[0, -1] == PAD
    w = attention_weights(LayoutBias(table, mode="soft"), lam=torch.ones(2))[0]
    real = (table.kind[0] != PAD).nonzero().squeeze(1)
    assert w[:, real][:, :, 21:].eq(0).all()
    assert torch.isfinite(w).all()


def test_flex_forward_matches_sdpa_on_cpu():
    torch.manual_seed(0)
    B, H, D = 2, 2, 16
    boxes = [[0.0, 0.0, 0.5, 0.75], [0.25, 0.25, 1.0, 1.0]]
    table = make_table(boxes, num_null=2, batch=B)
    keep = torch.tensor([[0, 1, 2, 3, 4] + list(range(6, 21)), [0, 1, 2, 3, 4] + list(range(5, 20))])
    table = table.gather(keep)  # the encoder's per-sample kept tokens (not a multiple of the flex block)
    N = table.kind.shape[1]
    q, k, v = torch.randn(3, B, H, N, D)
    lam = torch.tensor([0.5, 2.0])
    for mode, bonus in (("soft", 0.0), ("hard", 0.0), ("soft", 2.5), ("hard", 2.5)):
        bias = LayoutBias(table, mode=mode, penalise_null=True, bonus=bonus)
        ref = sdpa_attention(q, k, v, bias=bias, lam=lam)
        out = flex_attention(q, k, v, bias=bias, lam=lam)
        assert (out - ref).abs().max() <= 1e-5, (mode, bonus)
    key_mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    kt, vt = torch.randn(2, B, H, 7, D)
    ref = sdpa_attention(q, kt, vt, key_mask=key_mask)
    assert (flex_attention(q, kt, vt, key_mask=key_mask) - ref).abs().max() <= 1e-5


def test_backend_selection_and_errors():
    q = torch.randn(1, 1, 4, 8)
    assert select_attention("sdpa") is sdpa_attention
    assert torch.equal(select_attention("auto")(q, q, q), sdpa_attention(q, q, q))  # CPU: sdpa
    with pytest.raises(ValueError, match="unknown attention backend 'xla'"):
        select_attention("xla")
    with pytest.raises(ValueError, match="no attention dropout"):
        flex_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="no additive layout bias"):
        select_attention("flash")(q, q, q, bias=LayoutBias(make_table([])))


def test_auto_backend_is_the_fastest_exact_one():
    from structmar.attention import auto_backend

    assert auto_backend(is_cuda=False, cross=False, dropout_p=0.0, flash_installed=True) == "sdpa"
    assert auto_backend(is_cuda=True, cross=False, dropout_p=0.0, flash_installed=False) == "flex"
    assert auto_backend(is_cuda=True, cross=False, dropout_p=0.1, flash_installed=True) == "sdpa"  # flex: no dropout
    assert auto_backend(is_cuda=True, cross=True, dropout_p=0.1, flash_installed=True) == "flash"
    assert auto_backend(is_cuda=True, cross=True, dropout_p=0.0, flash_installed=False) == "sdpa"
