"""The CLIP text encoder of Stable Diffusion, built from open_clip's text transformer and tokenizer.

Parameter names are open_clip's (`token_embedding`, `positional_embedding`, `transformer.resblocks.N.*`,
`ln_final`, `text_projection`, `logit_scale`), which are the SD 2.x checkpoint names under
`cond_stage_model.model.`; SD 1.x files store the Hugging Face CLIPTextModel names, which checkpoint.py maps here.

SD 1.x: OpenAI CLIP ViT-L/14 text tower, QuickGELU, output of the last layer after ln_final, padded with the end token.
SD 2.x: OpenCLIP ViT-H/14 text tower, GELU, output of the penultimate layer after ln_final, padded with 0.
SDXL: both CLIP ViT-L/14 (as SD 1.x) and OpenCLIP ViT-bigG/14 (as SD 2.x), each the penultimate layer without
ln_final, joined per token (DualTextEncoder); bigG also gives the pooled embedding for the U-Net's vector y.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn as nn

SOT, EOT = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>
# The first open_clip_torch whose resblocks take (B, L, D): older ones are sequence-first, and our batch-first
# tensors then fail with a mask-shape error or, when B == 77, run silently wrong.
OPEN_CLIP_MIN = (2, 26, 1)


def check_open_clip(version: str | None = None):
    """Refuse an open_clip_torch older than OPEN_CLIP_MIN, in one line (the installed one when version is None)."""
    if version is None:
        try:
            version = importlib.metadata.version("open_clip_torch")
        except importlib.metadata.PackageNotFoundError:
            return  # open_clip_module says so when it is needed
    if tuple(int(p) for p in re.findall(r"\d+", version)[:3]) < OPEN_CLIP_MIN:
        need = ".".join(map(str, OPEN_CLIP_MIN))
        raise ImportError(f"latentdiff needs open_clip_torch >= {need} (batch-first text transformer), found "
                          f"{version}: pip install -U 'open_clip_torch>={need}'")


check_open_clip()


def open_clip_module(name: str) -> types.ModuleType:
    """open_clip.<name> (tokenizer, transformer), loaded without running open_clip/__init__.py if that has not run.

    The package's __init__ imports every model family it knows (CoCa, timm and Hugging Face towers, pretrained
    tables): about a third of `generate`'s start-up, for two files it needs. A bare placeholder package stands in
    while the submodule loads; afterwards the placeholder and what loaded under it leave sys.modules again, so a
    later `import open_clip` is the ordinary, complete import (with its own copies of these classes).
    """
    full = f"open_clip.{name}"
    if "open_clip" in sys.modules:
        return importlib.import_module(full)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed: pip install open_clip_torch")
    placeholder = types.ModuleType("open_clip")
    placeholder.__path__ = list(spec.submodule_search_locations)
    placeholder.__spec__ = spec
    before = set(sys.modules)
    sys.modules["open_clip"] = placeholder
    try:
        return importlib.import_module(full)
    finally:
        for key in set(sys.modules) - before:
            if key == "open_clip" or key.startswith("open_clip."):
                del sys.modules[key]


class BoundedCache(dict):
    """A dict that starts again from `keep` when it reaches `limit` entries. open_clip's tokenizer memoizes the BPE
    split of every word it has seen, so a server tokenizing clients' prompts would grow without end (a few hundred
    prompts of random words held 90,000 entries)."""

    def __init__(self, keep: dict, limit: int):
        super().__init__(keep)
        self.keep, self.limit = dict(keep), limit

    def __setitem__(self, key, value):
        if len(self) >= self.limit:
            self.clear()
            self.update(self.keep)
        super().__setitem__(key, value)


TOKENIZER_CACHE_ENTRIES = 20_000  # about 4 MB of memoized words; more than a vocabulary's worth of English


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """open_clip's byte-pair tokenizer with the vocabulary bundled in the package (no downloads)."""
    tokenizer = open_clip_module("tokenizer").SimpleTokenizer()
    tokenizer.cache = BoundedCache(tokenizer.cache, TOKENIZER_CACHE_ENTRIES)
    return tokenizer


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"  # SD1 (OpenAI CLIP): quick_gelu; SD2 (OpenCLIP ViT-H): gelu
    output_layer: str = "last"  # SD1: "last"; SD2: "penultimate" (then ln_final)
    pad: str = "eos"  # SD1 pads to 77 with the end token 49407; open_clip / SD2 pads with 0 ("zero")
    embed_dim: int = 0  # width of text_projection (+ logit_scale): unused by SD2, SDXL's pooled output; 0: none (SD1)
    output_ln_final: bool = True  # ln_final on the returned hidden states (SD1, SD2); SDXL takes them without


class TextEncoder(nn.Module):
    """tokenize(prompts) -> (B, 77) ids; forward(ids) -> (B, 77, width); encode(prompts) handles long prompts."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"text.act must be 'quick_gelu' or 'gelu', got {cfg.act!r}")
        if cfg.output_layer not in ("last", "penultimate"):
            raise ValueError(f"text.output_layer must be 'last' or 'penultimate', got {cfg.output_layer!r}")
        if cfg.pad not in ("eos", "zero"):
            raise ValueError(f"text.pad must be 'eos' or 'zero', got {cfg.pad!r}")
        self.config = cfg
        self.embeddings: dict[str, torch.Tensor] = {}  # textual inversion (set_embeddings): not weights of the model
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        oc = open_clip_module("transformer")  # on use: a slow import
        act = oc.QuickGELU if cfg.act == "quick_gelu" else nn.GELU
        self.transformer = oc.Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act_layer=act,
                                          norm_layer=oc.LayerNorm)
        self.ln_final = oc.LayerNorm(cfg.width)
        if cfg.embed_dim:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
            self.logit_scale = nn.Parameter(torch.empty(()))
        self.init_weights()

    def init_weights(self):
        # open_clip's init (Radford et al. 2021); real weights come from a checkpoint.
        if self.positional_embedding.is_meta:
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.config.embed_dim:
            nn.init.normal_(self.text_projection, std=self.config.width ** -0.5)
            nn.init.constant_(self.logit_scale, 4.6052)  # log(100), CLIP's learned temperature after training

    @property
    def pad_id(self) -> int:
        return EOT if self.config.pad == "eos" else 0

    # ---- tokenization -------------------------------------------------------------------------------

    def set_embeddings(self, embeddings: dict[str, torch.Tensor]):
        """Textual-inversion embeddings {name: (n, width)}: a name in a prompt becomes its n vectors. They get token
        ids past the vocabulary (in the order given), so tokens still say which vector goes where."""
        self.embeddings = {k: v.to(self.token_embedding.weight) for k, v in embeddings.items()}
        self._embedding_ids, start = {}, self.extra_id
        for name, vectors in self.embeddings.items():
            self._embedding_ids[name] = list(range(start, start + len(vectors)))
            start += len(vectors)
        names = sorted(self.embeddings, key=len, reverse=True)  # the longest name first: "cat-v2" before "cat"
        self._embedding_pattern = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])", re.IGNORECASE) if names else None

    @property
    def extra_id(self) -> int:
        """The first token id past the vocabulary (and past CLIP's end token, which small test vocabularies lack)."""
        return max(self.config.vocab_size, EOT + 1)

    def encode_text(self, text: str) -> list[int]:
        """BPE ids of a prompt, each textual-inversion name in it replaced by its vectors' ids."""
        bpe = bpe_tokenizer()
        pattern = getattr(self, "_embedding_pattern", None)
        if pattern is None:
            return bpe.encode(text)
        ids, at = [], 0
        lower = {k.lower(): k for k in self.embeddings}
        for m in pattern.finditer(text):
            ids += bpe.encode(text[at:m.start()]) + self._embedding_ids[lower[m[1].lower()]]
            at = m.end()
        return ids + bpe.encode(text[at:])

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """token_embedding, with the ids past the vocabulary read from the textual-inversion vectors."""
        if not self.embeddings:
            return self.token_embedding(tokens)
        extra = tokens >= self.extra_id
        x = self.token_embedding(tokens.masked_fill(extra, 0))
        table = torch.cat(list(self.embeddings.values())).to(x.dtype)
        return x.masked_scatter(extra[..., None], table[(tokens[extra] - self.extra_id)])

    def _wrap(self, ids: list[int]) -> list[int]:
        """[SOT] ids [EOT] padded to the context length."""
        n = self.config.context_length
        ids = [SOT] + ids[: n - 2] + [EOT]
        return ids + [self.pad_id] * (n - len(ids))

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, 77) int64 token ids, truncated to 75 tokens between start and end, as CLIP's tokenizers do."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bpe = bpe_tokenizer()
        return torch.tensor([self._wrap(self.encode_text(p)) for p in prompts], dtype=torch.long)

    def num_chunks(self, prompts: str | list[str]) -> int:
        """How many 75-token chunks the longest prompt needs (at least 1)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per = self.config.context_length - 2
        bpe = bpe_tokenizer()
        return max([1] + [-(-len(self.encode_text(p)) // per) for p in prompts])

    def tokenize_chunks(self, prompts: str | list[str], min_chunks: int = 1) -> torch.Tensor:
        """(B, k, 77) ids: each prompt cut into 75-token chunks, each wrapped in start/end and padded (A1111-style).

        Every prompt gets the same k = max(min_chunks, chunks of the longest prompt), extra chunks being empty
        prompts, so conditional and unconditional embeddings can share one batch.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per = self.config.context_length - 2
        k = max(min_chunks, self.num_chunks(prompts))
        bpe = bpe_tokenizer()
        rows = []
        for p in prompts:
            ids = self.encode_text(p)
            rows.append([self._wrap(ids[i * per:(i + 1) * per]) for i in range(k)])
        return torch.tensor(rows, dtype=torch.long)

    # ---- the transformer ----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, width) hidden states (after ln_final unless the config says otherwise).

        clip_skip counts layers from the end, as in A1111: 1 = last layer, 2 = penultimate. None uses the
        config's output_layer (SD1: last, SD2: penultimate).
        """
        return self.hidden_and_pooled(tokens, clip_skip)[0]

    def hidden_and_pooled(self, tokens: torch.Tensor, clip_skip: int | None = None, pooled: bool = False):
        """(hidden states as forward returns them, pooled (B, embed_dim) or None).

        pooled: ln_final of the last layer at the end token, times text_projection (CLIP's text embedding, as
        SGM's FrozenOpenCLIPEmbedder2 and transformers' CLIPTextModelWithProjection compute it).
        """
        cfg = self.config
        if pooled and not cfg.embed_dim:
            raise ValueError("this text encoder has no text_projection (text.embed_dim = 0), so no pooled output")
        skip = clip_skip if clip_skip is not None else (1 if cfg.output_layer == "last" else 2)
        if not 1 <= skip <= cfg.layers:
            raise ValueError(f"clip_skip must be between 1 and {cfg.layers} (1 = last layer), got {clip_skip}")
        tokens = tokens.to(self.token_embedding.weight.device)
        L = tokens.shape[1]
        x = self.embed_tokens(tokens) + self.positional_embedding[:L]
        # Causal mask: CLIP's text tower was trained left-to-right, so token i only sees tokens <= i.
        mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        n = cfg.layers - (skip - 1)
        for i, block in enumerate(self.transformer.resblocks[: cfg.layers if pooled else n]):
            x = block(x, attn_mask=mask)
            if i == n - 1:
                hidden = self.ln_final(x) if cfg.output_ln_final else x
        if not pooled:
            return hidden, None
        # The end token has the highest id, and the first one is where the prompt ends (open_clip's argmax).
        end = tokens.argmax(dim=-1) if not self.embeddings else (tokens == EOT).int().argmax(dim=-1)
        eot = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), end]
        return hidden, eot @ self.text_projection

    def encode(self, prompts: str | list[str], clip_skip: int | None = None, min_chunks: int = 1) -> torch.Tensor:
        """(B, 77*k, width) conditioning: chunks of 75 tokens encoded separately and joined along the sequence."""
        tokens = self.tokenize_chunks(prompts, min_chunks)  # (B, k, 77)
        B, k, L = tokens.shape
        return self(tokens.view(B * k, L), clip_skip).view(B, k * L, -1)


class DualTextEncoder(nn.Module):
    """SDXL's two encoders, CLIP ViT-L (clip_l) and OpenCLIP ViT-bigG (clip_g): contexts joined per token."""

    def __init__(self, cfg_l: TextConfig, cfg_g: TextConfig):
        super().__init__()
        if cfg_l.context_length != cfg_g.context_length:
            raise ValueError("the two SDXL text encoders need the same context_length "
                             f"({cfg_l.context_length} vs {cfg_g.context_length})")
        self.clip_l = TextEncoder(cfg_l)
        self.clip_g = TextEncoder(cfg_g)

    def encode_with_pooled(self, prompts: str | list[str], clip_skip: int | None = None,
                           min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, 77*k, width_l + width_g) context, (B, embed_dim) pooled bigG embedding of the first chunk)."""
        hidden = []
        for enc in (self.clip_l, self.clip_g):  # same BPE, so both cut the prompts into the same k chunks
            tokens = enc.tokenize_chunks(prompts, min_chunks)  # (B, k, 77); the two differ in padding only
            B, k, L = tokens.shape
            h, pooled = enc.hidden_and_pooled(tokens.view(B * k, L), clip_skip, pooled=enc is self.clip_g)
            hidden.append(h.view(B, k * L, -1))
        return torch.cat(hidden, dim=-1), pooled.view(B, k, -1)[:, 0]

    def encode(self, prompts: str | list[str], clip_skip: int | None = None, min_chunks: int = 1) -> torch.Tensor:
        """The context alone, as TextEncoder.encode gives it."""
        return self.encode_with_pooled(prompts, clip_skip, min_chunks)[0]
