"""LoRA, LoCon, LoHa, LoKr, DoRA, full-diff and diffusers / PEFT adapter files on SD 1.x and SDXL-shaped models.

References: diffusers' own LoRA loading (`load_lora_weights` + `fuse_lora`, through peft) on the same weights converted
by diffusers' single-file converters, for kohya LoRA / LoCon and PEFT files; a float64 merge written here from the
LyCORIS formulas (and lycoris-lora's own functions where it has them) for LoHa, LoKr, DoRA and full diffs. Key names
in the test files come from the reference models' module names (diffusers' U-Net, transformers' CLIP), never from our
name table.
"""
import dataclasses
import os
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiff.io.adapters import read_lora
from latentdiff.io.checkpoint import build_models, open_clip_to_hf_clip, state_dict_for
from latentdiff.io.config import load_model_config
from latentdiff.models.lora import AdapterError, Patch, Patcher, Target, name_table, unet_diffusers_names
from test_sdxl import SMALL, bpe_files, hf_keys, hf_text_encoders  # noqa: F401 - bpe_files is a fixture
from test_text_encoder import perturbed

SD1_SMALL = """\
model:
  name: sd1-small
  image_size: 64
  unet: {model_channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [1, 2], num_heads: 4,
         context_dim: 48, norm_groups: 8}
  vae: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, norm_groups: 8, resolution: 64}
  text: {vocab_size: 1000, width: 48, layers: 2, heads: 4, act: quick_gelu, output_layer: last, pad: eos}
"""


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- the small models and their diffusers / transformers twins ------------------------------------------

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1")
    (d / "sd1.yaml").write_text(SD1_SMALL)
    models = build_models(load_model_config(d / "sd1.yaml"))
    for m in (models.unet, models.text):
        perturbed(m, seed=3)
    return d, models


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    (d / "small.yaml").write_text(SMALL)
    models = build_models(load_model_config(d / "small.yaml"))
    for m in (models.unet, models.text):
        perturbed(m, seed=4)
    return d, models


def diffusers_unet_config(models, sdxl=False) -> dict:
    """diffusers' UNet2DConditionModel config for our U-Net, by diffusers' own reading of an LDM config."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    cfg = models.config.unet
    params = dataclasses.asdict(cfg) | {"transformer_depth": cfg.transformer_depth}
    if sdxl:
        params |= {"num_classes": "sequential"}
        del params["num_heads"]
    section = "network_config" if sdxl else "unet_config"
    original = {"model": {"params": {section: {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2]}}}}}}
    ucfg = create_unet_diffusers_config_from_ldm(original, state_dict_for(models))
    ucfg["norm_num_groups"] = cfg.norm_groups
    if sdxl:  # diffusers infers text_time only for SDXL's own context widths
        ucfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    return ucfg


def diffusers_unet_state(file, ucfg) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    return convert_ldm_unet_checkpoint(file, ucfg)


def diffusers_unet(models, sdxl=False):
    from diffusers import UNet2DConditionModel
    ucfg = diffusers_unet_config(models, sdxl)
    unet = UNet2DConditionModel(**ucfg).eval()
    unet.load_state_dict(diffusers_unet_state(state_dict_for(models), ucfg), strict=True)
    return unet


def hf_text(models):
    from transformers import CLIPTextConfig, CLIPTextModel
    t = models.config.text
    te = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=4 * t.width,
                                      num_hidden_layers=t.layers, num_attention_heads=t.heads, bos_token_id=998,
                                      eos_token_id=999, pad_token_id=999, hidden_act="quick_gelu")).eval()
    te.load_state_dict(hf_keys(open_clip_to_hf_clip(models.text.state_dict()), te), strict=True)
    return te


def diffusers_pipe(models, bpe_files, sdxl=False):
    """diffusers' pipeline around the converted U-Net and text encoders (its VAE is a stand-in: not compared)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>", model_max_length=77)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8)
    if sdxl:
        return sdxl_pipeline(diffusers_unet(models, True), *hf_text_encoders(state_dict_for(models)), bpe_files)
    return StableDiffusionPipeline(vae=vae, text_encoder=hf_text(models), tokenizer=tok,
                                   unet=diffusers_unet(models), scheduler=EulerDiscreteScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(unet, hf_l, hf_g, bpe_files):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>", model_max_length=77)
    return StableDiffusionXLPipeline(vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=8), text_encoder=hf_l,
                                     text_encoder_2=hf_g, tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler(steps_offset=1), add_watermarker=False)


def linear_and_conv(module, prefix=""):
    """{module name: weight shape} of every Linear and Conv2d (the layers LoRA trainers wrap)."""
    return {prefix + name: tuple(m.weight.shape) for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def kohya_names(pipe, models=None):
    """kohya's module names: lora_unet_ + the diffusers U-Net's names (SD 1.x) or, given the SDXL models, the names of
    the SDXL checkpoint layout (kohya trains SDXL on sgm's U-Net); lora_te[N]_ + transformers' CLIP names under
    text_model (whatever level this transformers version nests them at)."""
    encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)] if models is not None \
        else [("lora_te_", pipe.text_encoder)]
    return kohya_unet_names(pipe.unet if models is None else models.unet) | kohya_text_names(encoders)


def kohya_unet_names(unet):
    """lora_unet_ + the names of the layers kohya wraps in this U-Net (diffusers' or ours, whichever is given)."""
    def wrapped(name):
        return any(s in name for s in ("transformer_blocks", "resnets", "samplers", "proj_", "in_layers",
                                       "out_layers", "emb_layers", "skip_connection", ".op", ".conv"))
    return {"lora_unet_" + k.replace(".", "_"): s for k, s in linear_and_conv(unet).items() if wrapped(k)}


def kohya_text_names(encoders):
    """lora_te*_ names of every Linear in the transformers CLIP encoders' layers: [(prefix, encoder)]."""
    out = {}
    for prefix, te in encoders:
        for k, s in linear_and_conv(te).items():
            if "encoder.layers" in k:
                out[prefix + "text_model_" + k.removeprefix("text_model.").replace(".", "_")] = s
    return out


def random_lora(names, rank=4, seed=0, conv3x3=True, alpha=True, scale=0.2):
    """kohya LoRA / LoCon tensors for each module: 3x3 convs get a 3x3 down and a 1x1 up."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in names.items():
        if len(shape) == 4 and shape[2:] == (3, 3) and not conv3x3:
            continue
        down = (rank, shape[1], *shape[2:])
        up = (shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        state[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * scale
        state[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * scale
        if alpha:
            state[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def ours_and_theirs(models, pipe, x, t, ctx, tokens, y=None, added=None):
    with torch.no_grad():
        ours_u = models.unet(x, t, ctx) if y is None else models.unet(x, t, ctx, y)
        theirs_u = pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        return ours_u, theirs_u


# ---- name tables --------------------------------------------------------------------------------------------

def test_unet_diffusers_names_are_diffusers_converters_names(sd1, sdxl):
    """Our walk of the blocks names every tensor as diffusers' single-file converter does (SD 1.x and SDXL layouts)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    for (_, models), is_xl in ((sd1, False), (sdxl, True)):
        d_unet = diffusers_unet(models, is_xl)
        ours = models.unet.state_dict()
        tagged = {"model.diffusion_model." + k: torch.full((1,), float(i)) for i, k in enumerate(ours)}
        converted = convert_ldm_unet_checkpoint(tagged, dict(d_unet.config))
        theirs = {list(ours)[int(v.item())]: k for k, v in converted.items()}
        assert unet_diffusers_names(models.unet) == theirs


def test_full_size_tables_cover_every_adapter_target():
    """Every Linear / Conv2d of the full-size SD 1.5 and SDXL U-Nets and text encoders has a kohya name."""
    from latentdiff.io.checkpoint import _meta_models
    for preset, n_te in (("sd15", 1), ("sdxl-base", 2)):
        models = _meta_models(load_model_config(f"configs/{preset}.yaml"))
        table = name_table(models.unet, models.text)
        unet_weights = {t.weight for t in table.values() if t.root == "unet"}
        assert unet_weights == {n + ".weight" for n in linear_and_conv(models.unet)}
        layers = models.config.text.layers + (models.config.text2.layers if n_te == 2 else 0)
        # q, k, v, out_proj, fc1, fc2 per layer, each with and without text_model_, (+ bigG's text_projection)
        assert sum(t.root == "text" for t in table.values()) == 12 * layers + (1 if n_te == 2 else 0)


# ---- parity with diffusers: kohya LoRA / LoCon and PEFT files --------------------------------------------------

@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_kohya_lora_and_locon_match_diffusers_sd1(sd1, bpe_files, weight, tmp_path):
    d, models = sd1
    pipe = diffusers_pipe(models, bpe_files)
    names = kohya_names(pipe)
    assert any("resnets_0_conv1" in n for n in names) and any("downsamplers" in n for n in names)
    path = tmp_path / "locon.safetensors"
    save_file(random_lora(names, seed=1), str(path), metadata={"ss_network_module": "networks.lora"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key matched: no warning
        adapter = read_lora(path, models.unet, models.text)
    assert len(adapter.patches) == len(names)
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 48)
    tokens = torch.randint(0, 1000, (2, 77))
    before, _ = ours_and_theirs(models, pipe, x, t, ctx, tokens)
    patcher = Patcher(models.unet, models.text)
    patcher.apply([(adapter, weight, weight)])
    pipe.load_lora_weights(str(path), adapter_name="a")
    pipe.fuse_lora(lora_scale=weight)
    ours, theirs = ours_and_theirs(models, pipe, x, t, ctx, tokens)
    assert rel(ours, theirs) <= 1e-4 and rel(ours, before) > 1e-2
    with torch.no_grad():
        assert rel(models.text(tokens), pipe.text_encoder(tokens).last_hidden_state) <= 1e-4
    patcher.apply([])
    ours_again, _ = ours_and_theirs(models, pipe, x, t, ctx, tokens)
    assert torch.equal(ours_again, before)


def sdxl_inputs(models):
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 96)
    pooled, time_ids = torch.randn(2, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 0, 8, 64, 64]])
    from latentdiff.models.unet import micro_conditioning
    return x, t, ctx, micro_conditioning(pooled, time_ids), {"text_embeds": pooled, "time_ids": time_ids}


def test_kohya_sdxl_lora_with_two_text_encoders_matches_diffusers(sdxl, bpe_files, tmp_path):
    """SDXL kohya names are the sgm U-Net's (input_blocks_4_1_...), te1 is CLIP-L, te2 bigG, whose q/k/v land in
    row blocks of open_clip's fused in_proj_weight."""
    d, models = sdxl
    pipe = diffusers_pipe(models, bpe_files, sdxl=True)
    names = kohya_names(pipe, models)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names) and any("lora_te2_" in n for n in names)
    path = tmp_path / "xl.safetensors"
    save_file(random_lora(names, seed=2), str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    adapter = read_lora(path, models.unet, models.text)
    assert len(adapter.patches) == len(names)
    x, t, ctx, y, added = sdxl_inputs(models)
    tokens = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        before = models.unet(x, t, ctx, y)
        text_before = models.text.clip_g(tokens)
    patcher = Patcher(models.unet, models.text)
    patcher.apply([(adapter, 0.8, 0.8)])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    with torch.no_grad():
        ours, theirs = models.unet(x, t, ctx, y), pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        hidden_l = pipe.text_encoder(tokens, output_hidden_states=True).hidden_states[-2]
        hidden_g = pipe.text_encoder_2(tokens, output_hidden_states=True).hidden_states[-2]
        assert rel(models.text.clip_l(tokens), hidden_l) <= 1e-4
        assert rel(models.text.clip_g(tokens), hidden_g) <= 1e-4 and rel(models.text.clip_g(tokens), text_before) > 1e-2
    patcher.apply([])  # the fixture's models are shared with the tests below
    assert rel(ours, theirs) <= 1e-4 and rel(ours, before) > 1e-2


def peft_file(parts, rank=4, seed=5, scale=0.2):
    """diffusers' own format: unet.<module>.lora_A / lora_B (Linear layers), text_encoder[_2].<module>.lora_A / B, for
    [(prefix, diffusers / transformers module)]."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module in parts:
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear) and ("attn" in name or "ff" in name or "mlp" in name):
                state[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale
                state[f"{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
    return state


def pipe_parts(pipe, sdxl=False):
    return [("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)] + \
        ([("text_encoder_2.", pipe.text_encoder_2)] if sdxl else [])


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_peft_files_match_diffusers(which, sd1, sdxl, bpe_files, tmp_path):
    import json
    is_xl = which == "sdxl"
    d, models = sdxl if is_xl else sd1
    models = dataclasses.replace(models, unet=_copy(models.unet), text=_copy(models.text))
    pipe = diffusers_pipe(models, bpe_files, sdxl=is_xl)
    path = tmp_path / "peft.safetensors"
    sections = ["unet", "text_encoder"] + (["text_encoder_2"] if is_xl else [])
    state = peft_file(pipe_parts(pipe, is_xl))
    meta = {}
    for s in sections:
        targets = sorted({k[len(s) + 1:-len(".lora_A.weight")] for k in state if k.startswith(s + ".")
                          and k.endswith("lora_A.weight")})
        meta.update({f"{s}.r": 4, f"{s}.lora_alpha": 2 if s == "unet" else 8, f"{s}.target_modules": targets})
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    adapter = read_lora(path, models.unet, models.text)
    unet_before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    Patcher(models.unet, models.text).apply([(adapter, 0.5, 0.5)])
    changed = [k for k, v in models.unet.state_dict().items() if not torch.equal(v, unet_before[k])]
    assert len(changed) == sum(k.startswith("unet.") and k.endswith("lora_A.weight") for k in state)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.5)
    tokens = torch.randint(0, 999, (2, 77))
    with torch.no_grad():
        if is_xl:
            x, t, ctx, y, added = sdxl_inputs(models)
            ours, theirs = models.unet(x, t, ctx, y), pipe.unet(x, t, encoder_hidden_states=ctx,
                                                              added_cond_kwargs=added).sample
            text_pairs = [(models.text.clip_l(tokens), pipe.text_encoder(tokens, output_hidden_states=True)
                           .hidden_states[-2]),
                          (models.text.clip_g(tokens), pipe.text_encoder_2(tokens, output_hidden_states=True)
                           .hidden_states[-2])]
        else:
            x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 48)
            ours, theirs = models.unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample
            text_pairs = [(models.text(tokens), pipe.text_encoder(tokens).last_hidden_state)]
    assert rel(ours, theirs) <= 1e-4
    for a, b in text_pairs:
        assert rel(a, b) <= 1e-4
    with torch.no_grad():  # and the adapter did change the outputs (the same inputs through the base model)
        base = dataclasses.replace(models, unet=_copy(models.unet))
        base.unet.load_state_dict(unet_before)
        plain = base.unet(x, t, ctx, y) if is_xl else base.unet(x, t, ctx)
    assert rel(plain, theirs) > 1e-3


def _copy(module):
    import copy
    return copy.deepcopy(module)


# ---- LyCORIS formats, DoRA, full diffs: a float64 merge written from the formulas, and lycoris-lora's own ----------

def _targets(models):
    """Three layers of the SD 1.x model by their kohya names (diffusers spelling, as LyCORIS writes SD 1.x files):
    a Linear, a 3x3 conv and a text q projection (a row block of open_clip's in_proj_weight)."""
    t = models.text
    width = t.config.width
    return {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q":
            ("unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight", None),
            "lora_unet_up_blocks_0_resnets_1_conv1": ("unet", "output_blocks.1.0.in_layers.2.weight", None),
            "lora_te_text_model_encoder_layers_1_self_attn_k_proj":
            ("text", "transformer.resblocks.1.attn.in_proj_weight", (width, 2 * width))}


def _weight(models, root, name, rows):
    w = (models.unet if root == "unet" else models.text).get_parameter(name).detach()
    return w if rows is None else w[rows[0]:rows[1]]


def reference_delta(kind, t, w0, mult):
    """The change each format makes, in float64, from LyCORIS' and A1111's formulas (not our code)."""
    t = {k: v.double() for k, v in t.items()}
    w0 = w0.double()
    if kind == "loha":
        def half(i):
            if f"hada_t{i}" in t:  # Tucker: t (r, r, kh, kw) contracted with a (r, out), b (r, in)
                return torch.einsum("ijkl,ip,jr->prkl", t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"])
            return (t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"].flatten(1)).reshape(w0.shape)
        dw = half(1) * half(2) * t["alpha"] / t["hada_w1_b"].shape[0]
    elif kind == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_t2" in t:
            w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        elif "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        out = torch.zeros(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:], dtype=torch.float64)
        for i in range(w1.shape[0]):  # the Kronecker product written out block by block
            for j in range(w1.shape[1]):
                out[i * w2.shape[0]:(i + 1) * w2.shape[0], j * w2.shape[1]:(j + 1) * w2.shape[1]] = w1[i, j] * w2
        rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        dw = out.reshape(w0.shape) * (t["alpha"] / rank if rank and "alpha" in t else 1.0)
    elif kind == "full":
        dw = t["diff"]
    else:  # lora, with a CP core when lora_mid is there
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
        if "lora_mid.weight" in t:
            dw = torch.einsum("nmkl,in,mj->ijkl", t["lora_mid.weight"], up, down)
        else:
            dw = (up @ down).reshape(w0.shape)
        dw = dw * t["alpha"] / t["lora_down.weight"].shape[0]
    if "dora_scale" in t:  # DoRA: W' = (W + dW) m / ||W + dW||, norm per input column; the multiplier scales W' - W
        merged = w0 + dw.reshape(w0.shape)
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w0.ndim - 2))
        return mult * (merged * t["dora_scale"] / norm - w0)
    return mult * dw.reshape(w0.shape)


def lycoris_tensors(kind, shape, g, rank=4, dora=False, bias=False):
    """Random tensors of one module in a LyCORIS file layout, for a weight of `shape`."""
    out_dim, in_dim, *k = shape

    def r(*s):
        return torch.randn(s, generator=g) * 0.3
    if kind == "loha" and k:
        t = {f"hada_t{i}": r(rank, rank, *k) for i in "12"}
        t |= {f"hada_w{i}_a": r(rank, out_dim) for i in "12"} | {f"hada_w{i}_b": r(rank, in_dim) for i in "12"}
    elif kind == "loha":
        t = {f"hada_w{i}_a": r(out_dim, rank) for i in "12"} | {f"hada_w{i}_b": r(rank, in_dim) for i in "12"}
    elif kind == "lokr" and k:  # w1 whole, w2 a Tucker core with its factors
        t = {"lokr_w1": r(4, 4), "lokr_t2": r(rank, rank, *k), "lokr_w2_a": r(rank, out_dim // 4),
             "lokr_w2_b": r(rank, in_dim // 4)}
    elif kind == "lokr":  # w1 factored, w2 whole
        t = {"lokr_w1_a": r(4, rank), "lokr_w1_b": r(rank, 4), "lokr_w2": r(out_dim // 4, in_dim // 4)}
    elif kind == "full":
        t = {"diff": r(*shape) * 0.1} | ({"diff_b": r(out_dim)} if bias else {})
    elif kind == "locon_cp":
        t = {"lora_down.weight": r(rank, in_dim, 1, 1), "lora_mid.weight": r(rank, rank, *k),
             "lora_up.weight": r(out_dim, rank, 1, 1)}
    else:  # lora
        t = {"lora_down.weight": r(rank, in_dim, *k), "lora_up.weight": r(out_dim, rank, *([1, 1] if k else []))}
    if kind != "full":
        t["alpha"] = torch.tensor(float(rank) * 0.75)
    if dora:
        t["dora_scale"] = torch.rand((1, in_dim, *[1] * len(k)), generator=g) + 0.5
    return t


CASES = [("loha", False), ("lokr", False), ("full", False), ("lora", True), ("loha", True), ("lokr", True)]


@pytest.mark.parametrize("kind,dora", CASES)
@pytest.mark.parametrize("mult", [1.0, -0.7])
def test_lycoris_formats_and_dora_match_a_float64_merge(sd1, kind, dora, mult, tmp_path):
    _, models = sd1
    targets = _targets(models)
    g = torch.Generator().manual_seed(11)
    state, want = {}, {}
    for module, (root, name, rows) in targets.items():
        w0 = _weight(models, root, name, rows)
        tensors = lycoris_tensors(kind, tuple(w0.shape), g, dora=dora, bias=_bias(models, name[:-6] + "bias", rows)
                                  is not None)
        state.update({f"{module}.{k}": v for k, v in tensors.items()})
        want[module] = w0.double() + reference_delta(kind if kind != "lora" else "lora", tensors, w0, mult)
    if kind == "lora":  # and the CP form of LoCon on the 3x3 conv
        conv = "lora_unet_up_blocks_0_resnets_1_conv1"
        w0 = _weight(models, *targets[conv])
        cp = lycoris_tensors("locon_cp", tuple(w0.shape), g, dora=dora)
        assert w0.shape[-2:] == cp["lora_mid.weight"].shape[-2:] == (3, 3)  # a 3x3 kernel in the Tucker core
        state = {k: v for k, v in state.items() if not k.startswith(conv)} | {f"{conv}.{k}": v for k, v in cp.items()}
        want[conv] = w0.double() + reference_delta("lora", cp, w0, mult)
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    adapter = read_lora(path, models.unet, models.text)
    biases = {name[:-len("weight")] + "bias": rows for root, name, rows in targets.values()}
    before = {b: _bias(models, b, rows) for b, rows in biases.items()}
    patcher = Patcher(models.unet, models.text)
    patcher.apply([(adapter, mult, mult)])
    try:
        for module, (root, name, rows) in targets.items():
            got = _weight(models, root, name, rows).double()
            assert rel(got, want[module]) <= 1e-5, module
            assert rel(got, _weight_original(patcher, root, name, rows)) > 1e-3
            bias = name[:-len("weight")] + "bias"
            if f"{module}.diff_b" in state:  # diff_b: the bias moves by mult * diff_b
                want_b = before[bias].double() + mult * state[f"{module}.diff_b"].double()
                assert rel(_bias(models, bias, rows).double(), want_b) <= 1e-6, module
    finally:
        patcher.apply([])


def _bias(models, name, rows):
    for root in (models.unet, models.text):
        try:
            b = root.get_parameter(name).detach().clone()
        except AttributeError:
            continue
        return b if rows is None else b[rows[0]:rows[1]]
    return None


def _weight_original(patcher, root, name, rows):
    w = patcher.originals[(root, name)].double()
    return w if rows is None else w[rows[0]:rows[1]]


def test_our_deltas_match_lycoris_lora_functions():
    """lycoris-lora's own LoHa, LoKr and DoRA functions give the same weights as our merge (multiplier 1)."""
    lycoris = pytest.importorskip("lycoris.functional")
    from lycoris.functional.general import weight_decompose
    from lycoris.functional.loha import diff_weight as loha_diff
    from lycoris.functional.lokr import kron_weight
    g = torch.Generator().manual_seed(5)
    for shape in ((32, 48), (32, 16, 3, 3)):
        w0 = torch.randn(shape, generator=g)
        target = Target("unet", "w.weight", shape=shape)
        t = lycoris_tensors("loha", shape, g)
        parts = {"w1a": t["hada_w1_a"], "w1b": t["hada_w1_b"], "w2a": t["hada_w2_a"], "w2b": t["hada_w2_b"],
                 "alpha": t["alpha"]} | ({"t1": t["hada_t1"], "t2": t["hada_t2"]} if len(shape) == 4 else {})
        ours, _ = Patch("m", target, "loha", parts).delta(w0)
        gamma = float(t["alpha"]) / 4
        theirs = loha_diff(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], parts.get("t1"),
                           parts.get("t2"), gamma=gamma, backend="torch").reshape(shape)
        assert rel(ours, theirs) <= 1e-5
        t = lycoris_tensors("lokr", shape, g)
        parts = {k.removeprefix("lokr_").replace("_a", "a").replace("_b", "b"): v for k, v in t.items()}
        ours, _ = Patch("m", target, "lokr", parts).delta(w0)
        theirs = kron_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                             t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"),
                             scale=float(t["alpha"]) / 4, backend="torch").reshape(shape)
        assert rel(ours, theirs) <= 1e-5
        t = lycoris_tensors("lora", shape, g, dora=True)
        parts = {"up": t["lora_up.weight"], "down": t["lora_down.weight"], "alpha": t["alpha"],
                 "dora_scale": t["dora_scale"]}
        ours, _ = Patch("m", target, "lora", parts).delta(w0)
        plain, _ = Patch("m", target, "lora", {k: v for k, v in parts.items() if k != "dora_scale"}).delta(w0)
        theirs = weight_decompose(w0 + plain, t["dora_scale"], 1.0, wd_on_out=False, backend="torch")
        assert rel(w0 + ours, theirs) <= 1e-5


# ---- several adapters, multipliers, half precision, exact removal ----------------------------------------------------

def test_several_adapters_separate_multipliers_and_exact_restore_in_half(sd1, tmp_path):
    """Two LoRAs with their own U-Net and text multipliers sum in float32 onto fp16 / bf16 weights; removing them or
    changing the set gives back exactly the weights a fresh application (or none) gives."""
    _, models = sd1
    g = torch.Generator().manual_seed(7)
    targets = _targets(models)
    files = []
    for k in range(2):
        state = {}
        for module, (root, name, rows) in targets.items():
            t = lycoris_tensors("lora", tuple(_weight(models, root, name, rows).shape), g)
            state.update({f"{module}.{key}": v for key, v in t.items()})
        save_file(state, str(tmp_path / f"l{k}.safetensors"))
        files.append((tmp_path / f"l{k}.safetensors", state))
    for dtype in (torch.float16, torch.bfloat16):
        unet, text = _copy(models.unet).to(dtype), _copy(models.text).to(dtype)
        half = dataclasses.replace(models, unet=unet, text=text)
        originals = {k: v.clone() for m in (unet, text) for k, v in m.state_dict().items()}
        a, b = (read_lora(path, unet, text) for path, _ in files)
        patcher = Patcher(unet, text)
        patcher.apply([(a, 0.5, 0.25), (b, 1.0, 0.0)])
        for module, (root, name, rows) in targets.items():
            w0 = originals[name] if rows is None else originals[name][rows[0]:rows[1]]
            unet_side = root == "unet"
            want = w0.double().clone()
            for (path, state), (mu, mt) in zip(files, ((0.5, 0.25), (1.0, 0.0))):
                tensors = {k[len(module) + 1:]: v for k, v in state.items() if k.startswith(module + ".")}
                want += reference_delta("lora", tensors, w0.float(), mu if unet_side else mt)
            got = (half.unet if unet_side else half.text).get_parameter(name)
            got = got if rows is None else got[rows[0]:rows[1]]
            assert got.dtype == dtype
            assert rel(got.double(), want) <= 1e-2  # fp16 / bf16 rounding of the result only
        fresh = {k: v.clone() for m in (unet, text) for k, v in m.state_dict().items()}
        patcher.apply([(b, 1.0, 0.0)])
        patcher.apply([(a, 0.5, 0.25), (b, 1.0, 0.0)])
        assert all(torch.equal(v, fresh[k]) for m in (unet, text) for k, v in m.state_dict().items())
        patcher.apply([])
        assert all(torch.equal(v, originals[k]) for m in (unet, text) for k, v in m.state_dict().items())



def test_a_merge_stopped_half_way_is_still_undone_exactly(sd1):
    """The fast merge keeps each original block by block: stopped between blocks (here the up factor runs out of
    rows after the first block), the rows it never reached are kept too, and removal gives back every bit."""
    _, models = sd1
    unet = _copy(models.unet).to(torch.bfloat16)
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"  # (32, 32)
    weight = unet.get_parameter(name)
    before = weight.detach().clone()
    target = Target("unet", name, shape=tuple(weight.shape))
    g = torch.Generator().manual_seed(3)
    patch = Patch("m", target, "lora", {"up": torch.randn(8, 4, generator=g), "down": torch.randn(4, 32, generator=g)})
    patcher = Patcher(unet, models.text)
    with pytest.raises(RuntimeError):
        patcher._write_low_rank("unet", name, patch, 1.0, rows=8)
    assert not torch.equal(weight[:8], before[:8])  # the first block was merged
    patcher.restore()
    assert torch.equal(weight, before)
    assert patcher.spare and not patcher.originals  # the buffer waits for the next apply; release() frees it
    patcher.release()
    assert not patcher.spare

# ---- wrong input: one line naming the file and the cause, nothing applied ------------------------------------------

def _write(path, state, metadata=None):
    save_file(state, str(path), metadata=metadata)
    return path


def test_wrong_input_is_one_line_naming_file_and_cause(sd1, tmp_path):
    _, models = sd1
    unet, text = models.unet, models.text
    before = {k: v.clone() for m in (unet, text) for k, v in m.state_dict().items()}
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a (32, 32) Linear
    good = {f"{q}.lora_down.weight": torch.randn(4, 32), f"{q}.lora_up.weight": torch.randn(32, 4)}
    cases = {
        "nomatch": ({"foo.lora_down.weight": torch.randn(4, 8), "foo.lora_up.weight": torch.randn(8, 4)},
                    r"none of its 2 keys matches a layer"),
        "nan": ({**good, f"{q}.lora_up.weight": torch.full((32, 4), float("nan"))}, r"NaN or infinity .*to_q"),
        "rank": ({**good, f"{q}.lora_up.weight": torch.randn(32, 8)}, r"rank mismatch in .*to_q.*\[32, 8\]"),
        "otherbase": ({f"{q}.lora_down.weight": torch.randn(4, 640), f"{q}.lora_up.weight": torch.randn(640, 4)},
                      r"do not fit this .* model's weights .*made for another base model"),
    }
    for name, (state, pattern) in cases.items():
        path = _write(tmp_path / f"{name}.safetensors", state)
        with pytest.raises(AdapterError, match=pattern) as e:
            read_lora(path, unet, text)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "cut.safetensors").write_bytes(_write(tmp_path / "ok.safetensors", good).read_bytes()[:60])
    with pytest.raises(AdapterError, match=r"LoRA .*cut.safetensors .*(truncated|corrupt)"):
        read_lora(tmp_path / "cut.safetensors", unet, text)

    class Evil:
        def __reduce__(self):
            return (exec, ("import sys; sys.exit(3)",))
    import pickle
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({f"{q}.lora_down.weight": Evil()}))
    with pytest.raises(AdapterError, match=r"evil.pt .*(refused|could not be read)"):
        read_lora(tmp_path / "evil.pt", unet, text)
    assert all(torch.equal(v, before[k]) for m in (unet, text) for k, v in m.state_dict().items())


def test_sdxl_lora_on_sd15_names_both_bases():
    """The base is read from kohya's metadata or SDXL-only keys, before any shape is looked at (full-size SD 1.5 on the
    meta device: only names and shapes are needed)."""
    from latentdiff.io.checkpoint import _meta_models
    from latentdiff.models.lora import family, read_adapter
    models = _meta_models(load_model_config("configs/sd15.yaml"))
    table = name_table(models.unet, models.text)
    xl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4)}
    for metadata in ({"ss_base_model_version": "sdxl_base_v1-0"}, {}):
        with pytest.raises(AdapterError, match=r"a LoRA for SDXL, and this model is SD 1\.x"):
            read_adapter(xl, metadata, table, family(models.unet, models.text))


def test_unmatched_keys_in_a_good_file_warn_once_with_count_and_examples(sd1, tmp_path):
    _, models = sd1
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{q}.lora_down.weight": torch.randn(4, 32), f"{q}.lora_up.weight": torch.randn(32, 4)}
    state |= {f"lora_unet_nowhere_{i}.lora_down.weight": torch.randn(4, 8) for i in range(5)}
    path = _write(tmp_path / "partial.safetensors", state)
    with pytest.warns(UserWarning) as record:
        adapter = read_lora(path, models.unet, models.text)
    assert len(record) == 1
    message = str(record[0].message)
    assert "5 of its keys match no layer" in message and message.count("lora_unet_nowhere_") == 3
    assert str(path) in message and len(adapter.patches) == 1


# ---- Pipeline, prompt tags, generate --------------------------------------------------------------------------------

def tiny_lora(path, models, seed=0, scale=0.3):
    """A kohya LoRA for the tiny test model: every attention and resnet layer of the U-Net (ldm spelling) and every
    text-encoder layer (Hugging Face spelling)."""
    names = {"lora_unet_" + k.replace(".", "_"): s for k, s in linear_and_conv(models.unet).items()
             if "transformer_blocks" in k or "in_layers" in k}
    for i in range(models.config.text.layers):
        w = models.config.text.width
        names |= {f"lora_te_text_model_encoder_layers_{i}_self_attn_{c}_proj": (w, w) for c in "qkv"}
        names[f"lora_te_text_model_encoder_layers_{i}_mlp_fc1"] = (4 * w, w)
    save_file(random_lora(names, seed=seed, scale=scale), str(path))
    return path


def pixels(image):
    import numpy as np
    return np.asarray(image.convert("RGB")).astype(int)


def test_pipeline_load_unload_and_prompt_tags(tiny_checkpoint, tmp_path):
    import numpy as np
    from latentdiff.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    originals = {k: v.clone() for m in (pipe.unet, pipe.text) for k, v in m.state_dict().items()}
    path = tiny_lora(tmp_path / "style.safetensors", pipe)
    run = dict(steps=2, seed=1, progress=False)
    base = pixels(pipe("a cat", **run).images[0])
    pipe.load_lora(path, 0.8)
    loaded = pipe("a cat", **run)
    assert np.abs(pixels(loaded.images[0]) - base).mean() > 1
    assert 'Lora hashes: "style: ' in loaded.infotexts[0]
    pipe.unload_lora()
    assert all(torch.equal(v, originals[k]) for m in (pipe.unet, pipe.text) for k, v in m.state_dict().items())
    assert np.array_equal(pixels(pipe("a cat", **run).images[0]), base)
    pipe.loras.dirs = [tmp_path]
    tagged = pipe("a cat <lora:style:0.8>", **run)
    assert np.array_equal(pixels(tagged.images[0]), pixels(loaded.images[0]))
    assert tagged.prompts == ["a cat <lora:style:0.8>"]  # the record keeps the tag, as A1111's does
    assert np.array_equal(pixels(pipe("a cat", **run).images[0]), base)  # the next call without it: gone
    half = pixels(pipe("a cat <lora:style:0.8:0>", **run).images[0])  # text encoders 0.8, U-Net 0 (A1111's order)
    assert not np.array_equal(half, base) and not np.array_equal(half, pixels(loaded.images[0]))
    now = {k: v.clone() for m in (pipe.unet, pipe.text) for k, v in m.state_dict().items()}
    with pytest.raises(AdapterError, match=r"unknown LoRA 'nope': no nope.safetensors .* in .*"):
        pipe("a cat <lora:nope> <lora:style>", **run)
    assert all(torch.equal(v, now[k]) for m in (pipe.unet, pipe.text) for k, v in m.state_dict().items())


def test_generate_lora_flag_png_record_and_from_png(tiny_checkpoint, tmp_path, capsys):
    from latentdiff.generate import main
    from latentdiff.io.images import parse_parameters, read_parameters
    from latentdiff.pipeline import Pipeline
    folder = tmp_path / "loras"
    folder.mkdir()
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    path = tiny_lora(folder / "style.safetensors", pipe)
    common = ["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--seed", "3"]
    assert main(["a cat", *common, "--lora", f"{path}:0.7", "-o", str(tmp_path / "a.png")]) == 0
    params = parse_parameters(read_parameters(tmp_path / "a.png"))
    assert params["prompt"] == "a cat <lora:style:0.7>"
    from latentdiff.io.adapters import short_hash
    assert params["Lora hashes"] == f"style: {short_hash(path)}"
    assert main(["--from-png", str(tmp_path / "a.png"), "--checkpoint", str(tiny_checkpoint), "--lora-dir",
                 str(folder), "-o", str(tmp_path / "b.png")]) == 0
    assert (pixels(Image.open(tmp_path / "a.png")) == pixels(Image.open(tmp_path / "b.png"))).all()
    assert main(["a cat", *common, "-o", str(tmp_path / "c.png")]) == 0
    assert (pixels(Image.open(tmp_path / "a.png")) != pixels(Image.open(tmp_path / "c.png"))).any()
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4)}, str(bad))
    for args, message in ((["a cat <lora:nope:1>", "--lora-dir", str(folder)], "unknown LoRA 'nope'"),
                          (["a cat", "--lora", str(tmp_path / "missing.safetensors")], "missing.safetensors not found"),
                          (["a cat", "--lora", f"{bad}:0.5"], "bad.safetensors"),
                          (["a cat <lora:style:x>", "--lora-dir", str(folder)], "bad multiplier")):
        assert main([*args, *common, "-o", str(tmp_path / "d.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ---- full size (opt-in: LATENTDIFF_FULL_SIZE=1; SD 1.5 needs about 10 GB of memory, SDXL about 12 GB) ---------------

def full_size_lora(fmt, kohya, parts):
    """A random LoRA at full size: kohya LoRA / LoCon on `kohya`'s names, or PEFT on the `parts` modules."""
    return random_lora(kohya, rank=8, seed=3, scale=0.05) if fmt == "kohya" else \
        peft_file(parts, rank=8, seed=3, scale=0.05)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LATENTDIFF_FULL_SIZE"), reason="full-size parity: set LATENTDIFF_FULL_SIZE=1")
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_full_size_sd15_lora_matches_diffusers(fmt, bpe_files, tmp_path):
    """Random full-size SD 1.5 and a random kohya LoRA / LoCon on every layer kohya wraps, or a PEFT file on every
    attention and feed-forward Linear: our U-Net and text encoder outputs after loading equal diffusers'
    (load_lora_weights + fuse_lora) within 1e-4 relative."""
    torch.manual_seed(0)
    models = build_models(load_model_config("configs/sd15.yaml"))
    for m in (models.unet, models.text):
        perturbed(m, seed=1)
    pipe = diffusers_pipe(models, bpe_files)
    path = tmp_path / "full.safetensors"
    save_file(full_size_lora(fmt, kohya_names(pipe), pipe_parts(pipe)), str(path))
    Patcher(models.unet, models.text).apply([(read_lora(path, models.unet, models.text), 0.7, 0.7)])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.7)
    torch.manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 77, 768)
    tokens = torch.randint(0, 49406, (1, 77))
    with torch.no_grad():
        ours, theirs = models.unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample
        text = rel(models.text(tokens), pipe.text_encoder(tokens).last_hidden_state)
    print(f"\nsd15 {fmt}: U-Net max rel diff {rel(ours, theirs):.2e}, text {text:.2e}")
    assert rel(ours, theirs) <= 1e-4 and text <= 1e-4


def full_size_sdxl(part: str):
    """SDXL's U-Net or its two text encoders (`part`: "unet" or "text") at full size with random weights, the same
    for the same part on every call; the rest of the models stays on the meta device (no memory)."""
    from latentdiff.io.checkpoint import _meta_models
    models = _meta_models(load_model_config("configs/sdxl-base.yaml"))
    module = getattr(models, part).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0 if part == "unet" else 1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for m in module.modules():  # norm gains near 1: a net whose signal neither dies nor explodes
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(1.0)
    return dataclasses.replace(models, **{part: module.eval()})


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LATENTDIFF_FULL_SIZE"), reason="full-size parity: set LATENTDIFF_FULL_SIZE=1")
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_full_size_sdxl_lora_matches_diffusers(fmt, sdxl, bpe_files, tmp_path):
    """Full-size SDXL and a random kohya LoRA / LoCon on every layer kohya wraps (the U-Net's, both text encoders'),
    or a PEFT file on every attention and feed-forward Linear: our outputs after loading equal diffusers' (load_lora_weights + fuse_lora) within 1e-4 relative. The U-Net and
    the encoders are checked one part at a time, and ours is run before diffusers' copy is made, so that two fp32
    SDXL U-Nets (10 GB each) are never in memory at once: ours is merged without keeping its originals, then rebuilt
    from the same seed and handed over to diffusers' U-Net (which takes the tensors, no copy)."""
    import gc

    from diffusers import UNet2DConditionModel
    from latentdiff.models.unet import micro_conditioning
    _, small = sdxl  # stand-ins for the parts not under test (diffusers' pipeline wants all of them)
    torch.manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 77, 2048)
    pooled, ids = torch.randn(1, 1280), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    tokens = torch.randint(0, 49406, (1, 77))
    results = {}
    for part in ("unet", "text"):
        models = full_size_sdxl(part)
        if part == "unet":
            with torch.device("meta"):  # diffusers' module names for the PEFT file
                parts = [("unet.", UNet2DConditionModel(**diffusers_unet_config(models, sdxl=True)))]
            state = full_size_lora(fmt, kohya_unet_names(models.unet), parts)
        else:
            hf_l, hf_g = hf_text_encoders(state_dict_for(models), models.config)
            state = full_size_lora(fmt, kohya_text_names([("lora_te1_", hf_l), ("lora_te2_", hf_g)]),
                                   [("text_encoder.", hf_l), ("text_encoder_2.", hf_g)])
            del hf_l, hf_g
        path = tmp_path / f"{part}.safetensors"
        save_file(state, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"} if fmt == "kohya" else None)
        adapter = read_lora(path, models.unet, models.text)
        assert len(adapter.patches) == sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in state)

        @torch.no_grad()
        def run(models):
            if part == "unet":
                return [models.unet(x, t, ctx, micro_conditioning(pooled, ids))]
            return [models.text.clip_l(tokens), models.text.clip_g(tokens)]
        before = run(models)
        Patcher(models.unet, models.text, keep_originals=False).apply([(adapter, 0.7, 0.7)])
        ours = run(models)
        assert all(rel(a, b) > 1e-2 for a, b in zip(ours, before))  # the LoRA changes every output
        del models, adapter, before
        gc.collect()
        models = full_size_sdxl(part)  # the base again, for diffusers
        if part == "unet":
            config = diffusers_unet_config(models, sdxl=True)
            with torch.device("meta"):
                unet = UNet2DConditionModel(**config).eval()
            unet.load_state_dict(diffusers_unet_state(state_dict_for(models), config), strict=True, assign=True)
            hf_l, hf_g = hf_text_encoders(state_dict_for(small))
        else:
            unet = diffusers_unet(small, sdxl=True)
            hf_l, hf_g = hf_text_encoders(state_dict_for(models), models.config)
        del models
        gc.collect()
        pipe = sdxl_pipeline(unet, hf_l, hf_g, bpe_files)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=0.7)
        with torch.no_grad():
            if part == "unet":
                theirs = [pipe.unet(x, t, encoder_hidden_states=ctx,
                                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample]
            else:
                theirs = [te(tokens, output_hidden_states=True).hidden_states[-2] for te in (hf_l, hf_g)]
        results[part] = [rel(a, b) for a, b in zip(ours, theirs)]
        del pipe, unet, hf_l, hf_g, theirs
        gc.collect()
    print(f"\nsdxl {fmt}: U-Net max rel diff {results['unet'][0]:.2e}, text (CLIP-L, bigG) "
          + ", ".join(f"{r:.2e}" for r in results["text"]))
    assert all(r <= 1e-4 for r in results["unet"] + results["text"])


def test_every_spelling_of_a_layer_reaches_the_same_weight(sd1):
    """kohya's diffusers and ldm spellings, PEFT, diffusers' old lora.down / attention-processor / lora_linear_layer
    forms, with and without the text_model level: one weight each."""
    from latentdiff.models.lora import group_modules
    _, models = sd1
    table = name_table(models.unet, models.text)
    unet_spellings = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
                      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight",
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight",
                      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"]
    text_spellings = ["lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight",
                      "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_linear_layer.down.weight",
                      "text_encoder.encoder.layers.1.self_attn.v_proj.lora_A.weight"]
    for spellings, weight, rows in ((unet_spellings, "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
                                     None), (text_spellings, "transformer.resblocks.1.attn.in_proj_weight", (96, 144))):
        for key in spellings:
            groups, unknown = group_modules({key: torch.zeros(1)}, sdxl=False)
            (module, parts), = groups.items()
            assert not unknown and parts.keys() == {"down"}, key
            assert (table[module].weight, table[module].rows) == (weight, rows), key


def test_onetrainer_te2_text_projection_is_applied_transposed(sdxl, tmp_path):
    """OneTrainer trains bigG's projection as transformers' Linear (out, in); open_clip keeps its transpose."""
    _, models = sdxl
    p0 = models.text.clip_g.text_projection.detach().clone()  # (width 32, embed 32)
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g)
    path = _write(tmp_path / "proj.safetensors", {"lora_te2_text_projection.lora_up.weight": up,
                                                   "lora_te2_text_projection.lora_down.weight": down,
                                                   "lora_te2_text_projection.alpha": torch.tensor(2.0)})
    patcher = Patcher(models.unet, models.text)
    patcher.apply([(read_lora(path, models.unet, models.text), 1.0, 0.5)])
    want = p0.double() + 0.5 * (up.double() @ down.double() * 2 / 4).t()
    assert rel(models.text.clip_g.text_projection.double(), want) <= 1e-6
    patcher.apply([])
    assert torch.equal(models.text.clip_g.text_projection, p0)


def test_plain_loras_merged_by_rows_equal_a_float64_merge_in_every_dtype_and_memory_format(sd1, monkeypatch):
    """Patcher's fast path for a plain LoRA (row blocks of weight + up @ down, no full-size delta) against a float64
    merge: on fp32, bf16 and channels_last copies of the U-Net (channels_last takes the general path), Linears and
    3x3 LoCon convs alike; removal gives every weight back bit for bit."""
    import copy
    from latentdiff.models.lora import family, read_adapter
    _, models = sd1
    table = {k: t for k, t in name_table(models.unet, models.text).items() if t.root == "unet" and not t.rows}
    picked = [k for k in sorted(table) if len(table[k].shape) == 2][:12] + \
             [k for k in sorted(table) if table[k].shape[2:] == (3, 3)][:6]
    g = torch.Generator().manual_seed(11)
    state = {}
    for k in picked:
        shape, rank = table[k].shape, 4
        down = (rank, shape[1], *shape[2:]) if len(shape) == 4 else (rank, shape[1])
        state[f"{k}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        state[f"{k}.lora_up.weight"] = torch.randn((shape[0], rank, 1, 1)[:len(shape)], generator=g) * 0.1
        state[f"{k}.alpha"] = torch.tensor(2.0)
    fast = []
    real = Patcher._write_low_rank
    monkeypatch.setattr(Patcher, "_write_low_rank", lambda self, *a, **k: fast.append(a[1]) or real(self, *a, **k))
    for dtype, fmt, tol, n_fast in ((torch.float32, torch.contiguous_format, 1e-6, 18),
                                    (torch.bfloat16, torch.contiguous_format, 8e-3, 18),
                                    (torch.float32, torch.channels_last, 1e-6, 12)):  # 3x3 convs: the general path
        fast.clear()
        unet = copy.deepcopy(models.unet).to(dtype=dtype, memory_format=fmt)
        before = {k: unet.get_parameter(table[k].weight).detach().clone() for k in picked}
        adapter = read_adapter(state, {}, name_table(unet, models.text), family(unet, models.text))
        patcher = Patcher(unet, models.text)
        patcher.apply([(adapter, 0.7, 0.7)])
        assert len(fast) == n_fast, (dtype, fmt, len(fast))
        for k in picked:
            up, down = state[f"{k}.lora_up.weight"].double(), state[f"{k}.lora_down.weight"].double()
            want = before[k].double() + 0.7 * 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(before[k].shape)
            got = unet.get_parameter(table[k].weight).double()
            assert (got - want).abs().max() <= tol * want.abs().max(), (k, dtype, fmt)
        patcher.apply([])
        assert all(torch.equal(unet.get_parameter(table[k].weight), before[k]) for k in picked)
