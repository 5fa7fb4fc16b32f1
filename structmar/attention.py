"""Attention for structmar: 2D RoPE, the layout-guided bias, and the backends (sdpa / flex / flash).

Every sequence the backbone attends over is a mix of buffer slots (slot 0 = text, then one slot per
layout box, the rest null) and image tokens at true grid cells. A `TokenTable` describes each position
compactly per sample (kind, cell, box in cells); the layout bias M in Softmax(QK^T/sqrt(d) + M) is a
function of two positions' table entries (`LayoutBias.score`), so the same rule gives the sdpa backend
its dense (B, H, N, N) additive mask and the flex backend its `score_mod` / `mask_mod`, which evaluate
it block by block inside the fused kernel and never materialise a B x H x N x N tensor.

The backend is chosen once, by name (`select_attention`); blocks call the returned function and never
branch on it. FlexAttention has no attention dropout: `auto` routes calls with dropout to sdpa (which
implements MAR's dropout exactly), and an explicit flex backend refuses dropout_p > 0 with a clear error;
train with attn_dropout=0 to get the fused flex kernel in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed, build_rotary_pos_embed

# Token kinds in a TokenTable.
IMAGE, TEXT, BOX, NULL, PAD = 0, 1, 2, 3, 4

# ---------------------------------------------------------------------------------------------
# 2D RoPE
# ---------------------------------------------------------------------------------------------


def rope_table(grid_size: int, head_dim: int, temperature: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary (sin, cos), each (grid_size**2 + 1, head_dim): half the rotary pairs turn with the
    row, half with the column (timm's interleaved layout); the extra last row is the identity
    rotation (sin 0, cos 1) used for buffer tokens."""
    sin, cos = build_rotary_pos_embed([grid_size, grid_size], dim=head_dim, in_pixels=False, temperature=temperature)
    sin = torch.cat([sin, sin.new_zeros(1, head_dim)])
    cos = torch.cat([cos, cos.new_ones(1, head_dim)])
    return sin, cos


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, N, D) by per-token sin/cos (B, N, D)."""
    return apply_rot_embed(x, sin.unsqueeze(1), cos.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Token table and layout bias
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenTable:
    """Per-sample description of each sequence position; every field is (B, N) long.

    kind: IMAGE / TEXT / BOX / NULL / PAD. cell: grid cell index row * g + col of image tokens
    (g*g, the identity RoPE row, for others). row, col: the image token's cell. col0, row0, col1, row1:
    a BOX token's cell range [col0, col1) x [row0, row1). Separate 2D fields keep flex's scalar
    indexing simple.
    """

    kind: torch.Tensor
    cell: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    col0: torch.Tensor
    row0: torch.Tensor
    col1: torch.Tensor
    row1: torch.Tensor

    def fields(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def gather(self, index: torch.Tensor) -> TokenTable:
        """The table of the positions `index` (B, M) (e.g. the encoder's kept tokens)."""
        return TokenTable(*(torch.gather(t, 1, index) for t in self.fields()))

    def pad(self, length: int) -> TokenTable:
        """Padded with PAD positions to `length` (the flex backend's bucketed length)."""
        extra = length - self.kind.shape[1]
        if extra == 0:
            return self
        kind, *rest = self.fields()
        return TokenTable(F.pad(kind, (0, extra), value=PAD), *(F.pad(t, (0, extra)) for t in rest))


def cell_ranges(boxes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Normalised xyxy boxes (..., 4) -> the grid cells they overlap, [col0, row0, col1, row1) long.

    A cell belongs to a box when their interiors overlap; a box thinner than a cell still gets one."""
    lo = torch.floor(boxes[..., :2] * grid_size).clamp(0, grid_size - 1)
    hi = torch.ceil(boxes[..., 2:] * grid_size).clamp(1, grid_size)
    hi = torch.maximum(hi, lo + 1)
    return torch.cat([lo, hi], -1).long()


def box_cells(boxes: torch.Tensor, box_mask: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, K, L) bool: token cell l (row-major) lies in real box k, by the rule of `cell_ranges`."""
    col0, row0, col1, row1 = cell_ranges(boxes, grid_size)[..., None, :].unbind(-1)  # (B, K, 1) each
    cell = torch.arange(grid_size * grid_size, device=boxes.device)
    row, col = cell // grid_size, cell % grid_size
    return (col >= col0) & (col < col1) & (row >= row0) & (row < row1) & box_mask.bool()[..., None]


@dataclass
class LayoutBias:
    """The layout-guided bias rule over a TokenTable.

    For image query i and BOX key j: 0 if i's cell lies in box j, else penalised. Penalised means
    -lambda_h (mode "soft", lambda >= 0 per head, passed per layer) or -inf (mode "hard").
    layout_to_image "box" applies the same rule to a BOX query's image keys ("open": no bias);
    penalise_text / penalise_null extend the penalty to image queries' TEXT / NULL keys. `bonus` > 0
    adds +bonus to an image query's logits on the layout tokens whose box covers it, so image tokens
    preferentially attend to their own layout tokens from the first step (without it a covering layout
    token starts with one share of ~120 keys, and a short run never learns to read it).
    PAD keys are always excluded (a PAD query sees only itself, so no row is ever empty).
    Rows never become all -inf: image queries always see the image and text tokens, buffer
    queries always see the buffer.
    """

    table: TokenTable
    mode: str = "soft"  # soft | hard
    layout_to_image: str = "box"  # box | open
    penalise_text: bool = False
    penalise_null: bool = False
    bonus: float = 0.0

    def _inside(self, b, img, box):
        t = self.table
        r, c = t.row[b, img], t.col[b, img]
        return (c >= t.col0[b, box]) & (r >= t.row0[b, box]) & (c < t.col1[b, box]) & (r < t.row1[b, box])

    def penalised(self, b, q, kv):
        """True where the bias applies, for broadcastable index tensors (or flex's scalar indices)."""
        t = self.table
        kq, kk = t.kind[b, q], t.kind[b, kv]
        q_img = kq == IMAGE
        out = q_img & (kk == BOX) & ~self._inside(b, q, kv)
        if self.layout_to_image == "box":
            out = out | ((kq == BOX) & (kk == IMAGE) & ~self._inside(b, kv, q))
        if self.penalise_text:
            out = out | (q_img & (kk == TEXT))
        if self.penalise_null:
            out = out | (q_img & (kk == NULL))
        return out

    def preferred(self, b, q, kv):
        """True where an image query meets a BOX key whose box covers it (where the bonus applies)."""
        t = self.table
        return (t.kind[b, q] == IMAGE) & (t.kind[b, kv] == BOX) & self._inside(b, q, kv)

    def valid(self, b, q, kv):
        """False for PAD keys (a PAD query keeps its own key)."""
        t = self.table
        return (t.kind[b, kv] != PAD) | (q == kv)

    def allowed(self, b, q, kv):
        """Hard mode's mask: kept (score unchanged) where True."""
        keep = self.valid(b, q, kv)
        if self.mode == "hard":
            keep = keep & ~self.penalised(b, q, kv)
        return keep

    def dense(self, lam: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (B, H or 1, N, N) for sdpa, from the same rule the flex path evaluates."""
        B, N = self.table.kind.shape
        dev = self.table.kind.device
        b = torch.arange(B, device=dev)[:, None, None]
        q = torch.arange(N, device=dev)[None, :, None]
        kv = torch.arange(N, device=dev)[None, None, :]
        neg_inf = torch.tensor(float("-inf"), device=dev, dtype=dtype)
        bias = torch.where(self.allowed(b, q, kv), torch.zeros((), device=dev, dtype=dtype), neg_inf)[:, None]
        if self.mode == "soft":
            bias = bias - lam.to(dtype)[None, :, None, None] * self.penalised(b, q, kv)[:, None].to(dtype)
        if self.bonus:
            bias = bias + self.bonus * self.preferred(b, q, kv)[:, None].to(dtype)
        return bias


def key_padding_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool (True = real key) -> (B, 1, 1, L) additive mask."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

# attend(q, k, v, bias=None, lam=None, key_mask=None, dropout_p=0.) -> (B, H, Nq, D); q/k/v are (B, H, N, D).
AttendFn = Callable[..., torch.Tensor]


def sdpa_attention(q, k, v, bias: LayoutBias | None = None, lam=None, key_mask=None, dropout_p: float = 0.0):
    """Reference path: PyTorch SDPA with a dense additive mask (exactly MAR's attention when bias is None)."""
    mask = None
    if bias is not None:
        mask = bias.dense(lam, q.dtype)
    if key_mask is not None:
        pad = key_padding_bias(key_mask, q.dtype)
        mask = pad if mask is None else mask + pad
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


FLEX_BLOCK = 128  # flex's block size; sequences are padded to a multiple of it so shapes repeat
_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_attention(q, k, v, bias: LayoutBias | None = None, lam=None, key_mask=None, dropout_p: float = 0.0):
    """FlexAttention: the soft bias as score_mod, hard bias and padding as block_mask; compiled once per
    padded shape (lengths are padded to a multiple of 128, so the encoder's varying length reuses kernels)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if dropout_p > 0:
        raise ValueError(
            "flex attention has no attention dropout: set attn_dropout=0 to train with attention='flex', "
            "or use attention='sdpa' for MAR's attention dropout"
        )
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    q_len = -(-n_q // FLEX_BLOCK) * FLEX_BLOCK
    kv_len = -(-n_kv // FLEX_BLOCK) * FLEX_BLOCK
    q = F.pad(q, (0, 0, 0, q_len - n_q))
    k = F.pad(k, (0, 0, 0, kv_len - n_kv))
    v = F.pad(v, (0, 0, 0, kv_len - n_kv))
    score_mod = None
    if bias is not None:
        if n_q != n_kv:
            raise ValueError("the layout bias applies to self-attention only")
        # captured tables must be plain contiguous inputs for the CPU kernel (unbind views are strided)
        table = TokenTable(*(t.contiguous() for t in bias.table.pad(q_len).fields()))
        rule = dataclasses.replace(bias, table=table)

        def mask_mod(b, h, qi, ki):
            return rule.allowed(b, qi, ki)

        lam_f = lam.to(torch.float32) if rule.mode == "soft" else None
        if lam_f is not None or rule.bonus:

            def score_mod(score, b, h, qi, ki):  # the branches are fixed per call: traced once
                if lam_f is not None:
                    score = score - lam_f[h] * rule.penalised(b, qi, ki).to(score.dtype)
                if rule.bonus:
                    score = score + rule.bonus * rule.preferred(b, qi, ki).to(score.dtype)
                return score
    else:
        keys = torch.ones(B, kv_len, dtype=torch.bool, device=q.device)
        keys[:, n_kv:] = False
        if key_mask is not None:
            keys[:, :n_kv] = key_mask

        def mask_mod(b, h, qi, ki):
            return keys[b, ki] | (qi >= n_q)  # padded query rows keep every key (their output is dropped)

    block_mask = create_block_mask(mask_mod, B, None, q_len, kv_len, device=q.device)
    out = _flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return out[:, :, :n_q]


def flash_attention(q, k, v, bias: LayoutBias | None = None, lam=None, key_mask=None, dropout_p: float = 0.0):
    """flash-attn (varlen over the real keys) for bias-free attention such as the text cross-attention."""
    if bias is not None:
        raise ValueError("flash attention takes no additive layout bias: use attention='flex' for the self-attention")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ValueError("attention backend 'flash' needs the flash-attn package (and a CUDA device)") from e
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    if key_mask is None:
        key_mask = torch.ones(B, n_kv, dtype=torch.bool, device=q.device)
    kv_lens = key_mask.sum(1, dtype=torch.int32)
    cu_k = F.pad(kv_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * n_q, n_q, dtype=torch.int32, device=q.device)
    sel = key_mask.flatten()
    k_flat = k.transpose(1, 2).reshape(B * n_kv, H, D)[sel]
    v_flat = v.transpose(1, 2).reshape(B * n_kv, H, D)[sel]
    out = flash_attn_varlen_func(q.transpose(1, 2).reshape(B * n_q, H, D), k_flat, v_flat, cu_q, cu_k, n_q,
                                 int(kv_lens.max()), dropout_p=dropout_p)
    return out.reshape(B, n_q, H, D).transpose(1, 2)


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def auto_backend(is_cuda: bool, cross: bool, dropout_p: float, flash_installed: bool) -> str:
    """The backend `auto` runs for one call (see select_attention)."""
    if not is_cuda:
        return "sdpa"
    if cross:
        return "flash" if flash_installed else "sdpa"
    return "sdpa" if dropout_p > 0 else "flex"


def select_attention(name: str, cross: bool = False) -> AttendFn:
    """The attention function for backend `name` (auto / sdpa / flex / flash).

    auto resolves per call to the fastest backend that computes exactly what is asked: for self-attention
    flex on CUDA without attention dropout (sampling, evaluation, or training with attn_dropout=0), sdpa
    otherwise (flex has no attention dropout; sdpa's memory-efficient kernel takes the float bias and
    dropout); for the bias-free cross-attention (`cross=True`) flash where flash-attn is installed on
    CUDA, sdpa elsewhere.
    """
    fixed = {"sdpa": sdpa_attention, "flex": flex_attention, "flash": flash_attention}
    if name in fixed:
        return fixed[name]
    if name != "auto":
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(fixed)}")

    def auto_attention(q, k, v, **kwargs):
        choice = auto_backend(q.is_cuda, cross, kwargs.get("dropout_p", 0.0), _flash_available())
        return fixed[choice](q, k, v, **kwargs)

    return auto_attention
