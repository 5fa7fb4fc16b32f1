"""CLIP text encoder read from a local directory (never from a hub).

A directory in the layout of `pretrained_models/clip-vit-base-patch32` holds both the tokenizer and
the text model. `write_random_clip` writes a random-init directory in the same format with a
tokenizer built offline, for tests and the demo.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn as nn

from structmar import atomic

CLIP_MAX_LENGTH = 77  # CLIP's context length

CLIP_HOWTO = (
    "download it once on a machine with internet access, e.g. "
    "`huggingface-cli download openai/clip-vit-base-patch32 --local-dir pretrained_models/clip-vit-base-patch32`, "
    "or write a random one for tests with structmar.text.write_random_clip(dir)"
)

# size -> CLIPTextConfig fields; "base" is ViT-B/32's text transformer (a smaller vocabulary: the
# offline tokenizer's byte-level symbols only).
_SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 projection_dim=512),
}


class TextEncoder(nn.Module):
    """Captions -> CLIP last hidden states, attention mask and pooled (end-of-text) embedding."""

    def __init__(self, tokenizer, model, name: str, max_length: int = CLIP_MAX_LENGTH):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.max_length = min(max_length, model.config.max_position_embeddings)
        self.dim = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        max_length: int = CLIP_MAX_LENGTH) -> TextEncoder:
        """Load tokenizer and text model from local directory `path` (no network access)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from structmar.files import check_model_directory, first_line

        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP directory {path} not found; {CLIP_HOWTO}")
        check_model_directory(path, "CLIP directory file")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
            model = CLIPTextModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"CLIP directory {path} is incomplete ({e}); {CLIP_HOWTO}") from e
        except (ValueError, RuntimeError) as e:  # a damaged file the checks above do not read (vocabulary, .bin)
            raise ValueError(f"CLIP directory {path}: {first_line(e)}") from None
        return cls(tokenizer, model.to(device), name=os.path.basename(os.path.normpath(path)), max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def id(self) -> str:
        c = self.model.config
        return f"{self.name}:w{c.hidden_size}-l{c.num_hidden_layers}-v{c.vocab_size}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions (B strings) -> tokens (B, L, D), mask (B, L) bool (True = real token), pooled (B, D).

        L is the longest caption in the batch (<= max_length); CLIP's causal attention makes each
        real token's state independent of the padding after it, so the padding length does not matter.
        """
        if not captions:
            raise ValueError("encode() needs at least one caption")
        enc = self.tokenizer(list(captions), padding="longest", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state, mask.bool(), out.pooler_output

    @torch.no_grad()
    def encode_tags(self, tags: list[str]) -> torch.Tensor:
        """Box tags (N strings: category names or free text) -> pooled embeddings (N, D)."""
        if not tags:
            return torch.zeros(0, self.dim, device=self.device)
        return self.encode(tags)[2]


def _offline_vocab() -> dict[str, int]:
    """CLIP's byte-level symbols, each again with the end-of-word suffix, then the two special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _word_merges(words) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right (its last symbol carries the end-of-word suffix)."""
    merges, seen = [], set()
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            if (current, symbol) not in seen:
                seen.add((current, symbol))
                merges.append((current, symbol))
            current += symbol
    return merges


def centre_pooled(model, tokenizer, texts) -> None:
    """Fit a CLIP text model's final layer-norm affine so the pooled embeddings of `texts` have zero mean and a
    mean per-dimension standard deviation of 1 (in place).

    A random-init CLIP's end-of-text states share one dominant direction: Shapes' 12 tags have a mean cosine
    of 0.91, and a model trained for minutes barely reads their colour from what is left (docs/demo.md). The
    affine is the model's own (the directory keeps CLIP's format): one shift and one scale for every token
    state, so differences between features are only scaled; what moves is the common offset.
    """
    texts = sorted(set(texts))
    if len(texts) < 2:
        raise ValueError(f"centring the pooled features needs at least 2 distinct texts, got {len(texts)}")
    pooled = TextEncoder(tokenizer, model, "calibration").encode_tags(texts).double()
    mean, spread = pooled.mean(0), pooled.std(0).mean()
    norm = model.get_submodule("final_layer_norm")
    with torch.no_grad():
        norm.bias.copy_(((norm.bias.double() - mean) / spread).to(norm.bias.dtype))
        norm.weight.copy_((norm.weight.double() / spread).to(norm.weight.dtype))


def write_random_clip(path: str, seed: int = 0, size: str = "tiny", words=(), centre_on=()) -> str:
    """Write a random-init CLIP text model and an offline-built CLIPTokenizer into `path` (save_pretrained).

    "tiny" (32 wide, 2 layers) is for tests; "base" is ViT-B/32's text transformer (512 wide, 12
    layers), which the demo uses as a fixed random feature extractor. Without merges the tokenizer
    spells every word symbol by symbol; `words` (e.g. a dataset's caption vocabulary) get BPE merges
    that make each of them about one token, as CLIP's own vocabulary does for common words, which keeps
    sequences (and the 12-layer encoder's cost) at real-CLIP lengths. With `centre_on` (e.g. a dataset's
    category names) the pooled features of those texts are centred and unit-scaled (`centre_pooled`).
    The directory is built beside `path` and renamed into place, so a killed write leaves no model
    without weights; an existing `path` is replaced. Returns `path`.
    """
    if size not in _SIZES:
        raise ValueError(f"unknown CLIP size {size!r}; known: {', '.join(_SIZES)}")
    tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_clip_files(tmp, seed, size, words, centre_on)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_clip_files(path: str, seed: int, size: str, words, centre_on) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = _offline_vocab()
    merges = _word_merges(w for w in words if len(w) > 1)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    atomic.write_text(os.path.join(path, "vocab.json"), json.dumps(vocab))
    atomic.write_text(os.path.join(path, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=CLIP_MAX_LENGTH,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **_SIZES[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    if centre_on:
        centre_pooled(model, tokenizer, centre_on)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
