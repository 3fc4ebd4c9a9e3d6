"""Text encoder: SD1 vs transformers CLIPTextModel, SD2 vs open_clip's text tower, tokenization vs CLIPTokenizer."""
import gzip
import json

import pytest
import torch

from latentdiff.io.checkpoint import hf_clip_to_open_clip
from latentdiff.models.text_encoder import EOT, SOT, TextConfig, TextEncoder, bpe_tokenizer

SD1_SMALL = TextConfig(width=64, layers=3, heads=4, act="quick_gelu", output_layer="last", pad="eos")
SD2_SMALL = TextConfig(width=64, layers=3, heads=4, act="gelu", output_layer="penultimate", pad="zero", embed_dim=32)

PROMPTS = ["a photograph of an astronaut riding a horse",
           "A Castle, on a hill; oil-painting (by Greg R.), 4k!!",
           "",
           "word " * 90,  # longer than 75 tokens: truncated
           "ünïcödé café — naïve 😀 emojis & symbols #1"]


def perturbed(module, seed=0):
    """Non-zero weights everywhere (SD zero-initialises output layers, which would hide whole blocks)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer built offline from the BPE file bundled with open_clip, SD1's settings."""
    from transformers import CLIPTokenizer
    from open_clip.tokenizer import default_bpe
    d = tmp_path_factory.mktemp("clip_tok")
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the merges CLIP uses, after the version line
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    vocab = dict(bpe_tokenizer().encoder)
    # open_clip spells the two special tokens differently from OpenAI's vocab.json; the ids are the same.
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (SOT, EOT)
    (d / "vocab.json").write_text(json.dumps(vocab))
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>")


def test_sd1_tokenize_matches_transformers(hf_tokenizer):
    ours = TextEncoder(TextConfig(width=8, layers=1, heads=1, vocab_size=49408)).tokenize(PROMPTS)
    ref = hf_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours.dtype == torch.int64 and ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, ref)
    assert (ours[2, 2:] == EOT).all()  # SD1 pads with the end token


def test_sd2_tokenize_matches_open_clip():
    import open_clip
    ours = TextEncoder(TextConfig(width=8, layers=1, heads=1, pad="zero")).tokenize(PROMPTS)
    assert torch.equal(ours, open_clip.tokenizer.tokenize(PROMPTS))


def test_long_prompt_chunks(hf_tokenizer):
    enc = TextEncoder(SD1_SMALL).eval()
    long = "a very detailed " * 40 + "castle"
    prompts = [long, "short prompt"]
    ids = hf_tokenizer(long, truncation=False).input_ids[1:-1]  # the prompt's tokens without start/end
    k = -(-len(ids) // 75)
    assert k == 2 and enc.num_chunks(prompts) == 2
    chunks = enc.tokenize_chunks(prompts)
    assert chunks.shape == (2, 2, 77)
    for i in range(k):
        part = ids[i * 75:(i + 1) * 75]
        assert chunks[0, i].tolist() == [SOT] + part + [EOT] * (77 - 1 - len(part))
    assert torch.equal(chunks[1, 0], enc.tokenize("short prompt")[0])
    assert torch.equal(chunks[1, 1], enc.tokenize("")[0])  # padded with an empty prompt
    with torch.no_grad():
        out = enc.encode(prompts)
        assert out.shape == (2, 154, 64)
        assert torch.allclose(out[:, 77:], enc(chunks[:, 1]), atol=1e-6)
        assert enc.encode("x", min_chunks=3).shape == (1, 231, 64)  # matched to a longer negative prompt


def test_sd1_matches_transformers_clip_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel
    hf_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
    torch.manual_seed(0)
    ref = perturbed(CLIPTextModel(hf_cfg)).eval()
    ours = TextEncoder(SD1_SMALL).eval()
    mapped, leftover = hf_clip_to_open_clip(ref.state_dict())
    assert leftover == []
    ours.load_state_dict(mapped, strict=True)
    tokens = ours.tokenize(PROMPTS[:3])
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        last = ours(tokens)
        penultimate = ours(tokens, clip_skip=2)
        ref_pen = ref.final_layer_norm(out.hidden_states[-2])
    assert (last - out.last_hidden_state).abs().max().item() <= 1e-4
    assert (penultimate - ref_pen).abs().max().item() <= 1e-4
    assert (last - penultimate).abs().max() > 0.1


def test_sd2_matches_open_clip_penultimate():
    from open_clip.transformer import TextTransformer
    ref = perturbed(TextTransformer(context_length=77, vocab_size=49408, width=64, heads=4, layers=3,
                                    output_dim=32, act_layer=torch.nn.GELU)).eval()
    ours = TextEncoder(SD2_SMALL).eval()
    state = dict(ref.state_dict(), logit_scale=torch.tensor(4.6))  # as in SD2 files, which store CLIP's scale
    ours.load_state_dict(state, strict=True)
    tokens = ours.tokenize(PROMPTS)
    with torch.no_grad():
        inter = ref.forward_intermediates(tokens, indices=[1, 2], normalize_intermediates=True,
                                          intermediates_only=True, output_fmt="NLC")["text_intermediates"]
        default, last = ours(tokens), ours(tokens, clip_skip=1)
    assert (default - inter[0]).abs().max().item() <= 1e-4  # SD2 default: penultimate layer, then ln_final
    assert (last - inter[1]).abs().max().item() <= 1e-4


def test_clip_skip_out_of_range_is_a_clear_error():
    enc = TextEncoder(SD1_SMALL)
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 3"):
        enc.encode("a cat", clip_skip=4)


def test_old_sd1_keys_without_text_model_level_map_the_same():
    from transformers import CLIPTextConfig, CLIPTextModel
    ref = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=100, max_position_embeddings=77))
    flat = ref.state_dict()
    nested = {"text_model." + k: v for k, v in flat.items()}
    nested["text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # float, as in some merged files
    a, la = hf_clip_to_open_clip(flat)
    b, lb = hf_clip_to_open_clip(nested)
    assert la == lb == [] and a.keys() == b.keys()
    q, k, v = (flat[f"encoder.layers.1.self_attn.{c}_proj.weight"] for c in "qkv")
    assert torch.equal(a["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))


def test_open_clip_floor_is_checked_at_import():
    """Versions before 2.26.1 have sequence-first resblocks: importing us with one fails in one line (item 9)."""
    import subprocess
    import sys

    from latentdiff.models.text_encoder import check_open_clip
    for ok in ("2.26.1", "2.32.0", "3.3.0"):
        check_open_clip(ok)
    with pytest.raises(ImportError, match=r">= 2\.26\.1.*found 2\.24\.0"):
        check_open_clip("2.24.0")
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda n: '2.20.0' if n == 'open_clip_torch' else real(n); import latentdiff.models.text_encoder")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("ImportError: latentdiff needs open_clip_torch >= 2.26.1 (batch-first "
                                                 "text transformer), found 2.20.0: pip install -U "
                                                 "'open_clip_torch>=2.26.1'")


def test_the_tokenizer_cache_is_bounded_and_changes_no_tokens(monkeypatch):
    """A server tokenizes whatever clients send: open_clip's per-word memo must not grow without end (issue 20's
    hostile pass found 90,000 entries after 200 prompts of random words), and clearing it changes no ids."""
    import random

    from latentdiff.models import text_encoder
    tok = text_encoder.bpe_tokenizer()
    monkeypatch.setattr(tok.cache, "limit", 500)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 12)))
             for _ in range(3000)]
    ids = [tok.encode(w) for w in words]
    assert len(tok.cache) <= 500
    assert all(k in tok.cache for k in tok.cache.keep)  # the special tokens stay
    fresh = type(tok)()  # open_clip's own tokenizer, unbounded
    assert ids == [fresh.encode(w) for w in words]
