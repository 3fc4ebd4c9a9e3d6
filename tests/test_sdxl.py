"""SDXL: the official single-file layout, checked against diffusers' converters, open_clip's ViT-bigG-14 config,
transformers' CLIP text models and diffusers' UNet2DConditionModel (text_time), and generate end to end."""
import dataclasses
import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentdiff.io.checkpoint import SDXL_G_PREFIX, SDXL_L_PREFIX, CheckpointError, _meta_models, build_models, detect_config, load_file, load_models, save_models, state_dict_for
from latentdiff.io.config import load_model_config
from latentdiff.pipeline import Pipeline
from latentdiff.models.text_encoder import EOT, DualTextEncoder, bpe_tokenizer
from latentdiff.models.unet import UNetConfig, UNetModel, micro_conditioning
from test_text_encoder import perturbed

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photograph of an astronaut riding a horse", "A Castle, on a hill; oil-painting (by Greg R.), 4k!!", "",
           "word " * 90, "ünïcödé café — naïve 😀 emojis & symbols #1"]

# Stability-AI/generative-models configs/inference/sd_xl_base.yaml, as written there (network and first stage).
SGM_SDXL_BASE = {"model": {"params": {
    "network_config": {"params": {
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
        "context_dim": 2048, "spatial_transformer_attn_type": "softmax-xformers"}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
        "dropout": 0.0}}},
    "scale_factor": 0.13025}}}

SMALL = """\
model:
  name: sdxl-small
  image_size: 64
  unet: {model_channels: 32, channel_mult: [1, 2, 2], num_res_blocks: 1, attention_resolutions: [4, 2], num_heads: -1,
         num_head_channels: 16, transformer_depth: [0, 1, 2], context_dim: 96, use_linear_in_transformer: true,
         norm_groups: 8, adm_in_channels: 1568}
  vae: {ch: 32, ch_mult: [1, 2, 2], num_res_blocks: 1, norm_groups: 8, resolution: 64, scale_factor: 0.13025,
        force_upcast: true}
  text: {width: 64, layers: 3, heads: 2, act: quick_gelu, output_layer: penultimate, pad: eos, embed_dim: 0,
         output_ln_final: false}
  text2: {width: 32, layers: 3, heads: 2, act: gelu, output_layer: penultimate, pad: zero, embed_dim: 32,
          output_ln_final: false}
"""


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def hf_keys(converted, model):
    """diffusers' converters name CLIP-L `text_model.*`; transformers 5's CLIPTextModel dropped that level."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return converted
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


@pytest.fixture(scope="module")
def full_file():
    """The full-size SDXL base modules on the meta device, written out in the single-file layout."""
    models = _meta_models(load_model_config(ROOT / "configs" / "sdxl-base.yaml"))
    return models, state_dict_for(models)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    (d / "small.yaml").write_text(SMALL)
    cfg = load_model_config(d / "small.yaml")
    models = build_models(cfg)
    for m in (models.unet, models.vae, models.text):
        perturbed(m, seed=1)
    return d, cfg, models


# ---- full size: key names and shapes against the reference implementations ------------------------

def test_full_size_unet_and_vae_convert_with_diffusers_strict(full_file):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    models, file = full_file
    ucfg = create_unet_diffusers_config_from_ldm(SGM_SDXL_BASE, file)
    assert ucfg["addition_embed_type"] == "text_time" and ucfg["projection_class_embeddings_input_dim"] == 2816
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(SGM_SDXL_BASE, file))
    for prefix, ref, converted in (
            ("model.diffusion_model.", unet, convert_ldm_unet_checkpoint(file, ucfg)),
            ("first_stage_model.", vae, convert_ldm_vae_checkpoint(file, vae.config))):
        ours = [k for k in file if k.startswith(prefix)]
        assert len(ours) == len(converted)  # the converters rename one to one: nothing of ours is left over
        assert shapes(converted) == shapes(ref.state_dict())
        ref.load_state_dict(converted, strict=True, assign=True)
    assert sum(v.numel() for k, v in file.items() if k.startswith("model.diffusion_model.")) == 2_567_463_684


def test_full_size_text_encoders_match_transformers_and_open_clip(full_file):
    import open_clip
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    models, file = full_file
    with torch.device("meta"):
        # OpenAI CLIP ViT-L/14's text tower, as SGM's FrozenCLIPEmbedder loads it
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu"))
        text_cfg = open_clip.get_model_config("ViT-bigG-14")["text_cfg"]
        g = text_cfg | {"embed_dim": open_clip.get_model_config("ViT-bigG-14")["embed_dim"]}
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=g["width"], intermediate_size=4 * g["width"], num_hidden_layers=g["layers"],
            num_attention_heads=g["heads"], projection_dim=g["embed_dim"], hidden_act="gelu"))
        bigg = open_clip.create_model("ViT-bigG-14", device="meta")
    converted = hf_keys(convert_ldm_clip_checkpoint(file), clip_l)
    assert len(converted) == sum(k.startswith(SDXL_L_PREFIX) for k in file)
    assert shapes(converted) == shapes(clip_l.state_dict())
    clip_l.load_state_dict(converted, strict=True, assign=True)

    # bigG: open_clip's own module (less the image tower, as SGM's FrozenOpenCLIPEmbedder2 deletes it)
    ours_g = {k[len(SDXL_G_PREFIX):]: v for k, v in file.items() if k.startswith(SDXL_G_PREFIX)}
    assert shapes(ours_g) == {k: v for k, v in shapes(bigg.state_dict()).items() if not k.startswith("visual.")}
    converted = convert_open_clip_checkpoint(clip_g, file, prefix=SDXL_G_PREFIX)
    assert shapes(converted) == shapes(clip_g.state_dict())
    clip_g.load_state_dict(converted, strict=True, assign=True)
    used = {id(v) for v in converted.values()}  # what diffusers' converter did not take: logit_scale only
    left = [k for k, v in ours_g.items() if id(v) not in used and "in_proj" not in k and k != "text_projection"]
    assert left == ["logit_scale"]


def test_sdxl_detected_from_keys_and_refiner_refused(full_file):
    _, file = full_file
    cfg = detect_config(file, {})
    assert cfg.name == "sdxl-base" and cfg.text2 is not None and cfg.unet.adm_in_channels == 2816
    assert cfg.image_size == 1024 and cfg.vae.scale_factor == 0.13025
    refiner = {k.replace(SDXL_G_PREFIX, "conditioner.embedders.0.model."): v for k, v in file.items()
               if not k.startswith(SDXL_L_PREFIX)}
    with pytest.raises(CheckpointError, match="SDXL refiner .* not supported"):
        detect_config(refiner, {}, name="refiner.safetensors")


# ---- reduced size: numbers against diffusers and transformers ---------------------------------------

def test_unet_matches_diffusers_text_time():
    """Per-level depth, no attention at level 0, label_emb: same output as UNet2DConditionModel (text_time)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    # context_dim 1280 is what makes diffusers' config inference pick SDXL's text_time embedding.
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4, 2),
                     num_heads=-1, num_head_channels=16, transformer_depth=(0, 1, 2), context_dim=1280,
                     use_linear_in_transformer=True, adm_in_channels=64 + 6 * 256)
    torch.manual_seed(0)
    ours = perturbed(UNetModel(cfg)).eval()
    params = dataclasses.asdict(cfg) | {"num_classes": "sequential", "transformer_depth": [0, 1, 2]}
    del params["num_heads"]  # absent from SGM's SDXL config: heads come from num_head_channels
    original = {"model": {"params": {"network_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    file = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ucfg = create_unet_diffusers_config_from_ldm(original, file)
    assert ucfg["addition_embed_type"] == "text_time" and ucfg["down_block_types"][0] == "DownBlock2D"
    ref = UNet2DConditionModel(**ucfg).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(file, ucfg), strict=True)

    x, ctx = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 1280)
    t, pooled = torch.tensor([999.0, 321.5]), torch.randn(2, 64)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 448]])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, ctx, micro_conditioning(pooled, time_ids))
        other = ours(x, t, ctx, micro_conditioning(pooled, time_ids.flip(0)))
    assert want.abs().mean() > 0.1 and (got - want).abs().max().item() <= 1e-4
    assert (other - want).abs().max() > 1e-3  # the sizes do reach the output
    with pytest.raises(ValueError, match="adm_in_channels"):
        ours(x, t, ctx)


def hf_text_encoders(file, config=None):
    """transformers' two SDXL text encoders loaded from a file by diffusers' converters, sized as a ModelConfig's
    text and text2 (default: the SMALL sizes)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def sizes(width, layers, heads):
        return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    cl, cg, projection = (sizes(64, 3, 2), sizes(32, 3, 2), 32) if config is None else \
        (*(sizes(t.width, t.layers, t.heads) for t in (config.text, config.text2)), config.text2.embed_dim)
    hf_l = CLIPTextModel(CLIPTextConfig(**cl, hidden_act="quick_gelu")).eval()
    hf_l.load_state_dict(hf_keys(convert_ldm_clip_checkpoint(file), hf_l), strict=True)
    hf_g = CLIPTextModelWithProjection(CLIPTextConfig(**cg, projection_dim=projection, hidden_act="gelu")).eval()
    hf_g.load_state_dict(convert_open_clip_checkpoint(hf_g, file, prefix=SDXL_G_PREFIX), strict=True)
    return hf_l, hf_g


def test_text_encoders_match_transformers_hidden_and_pooled(small):
    _, cfg, models = small
    text = models.text.eval()
    hf_l, hf_g = hf_text_encoders(state_dict_for(models))
    tl, tg = text.clip_l.tokenize(PROMPTS), text.clip_g.tokenize(PROMPTS)
    with torch.no_grad():
        ref_l = hf_l(input_ids=tl, output_hidden_states=True).hidden_states[-2]  # no final LayerNorm
        out_g = hf_g(input_ids=tg, output_hidden_states=True)
        ctx, pooled = text.encode_with_pooled(PROMPTS)
    # The 90-word prompt takes two 75-token chunks; the first is the truncated prompt, and gives the pooled output.
    assert ctx.shape == (len(PROMPTS), 154, 96) and pooled.shape == (len(PROMPTS), 32)
    ctx = ctx[:, :77]
    assert (ctx[..., :64] - ref_l).abs().max().item() <= 1e-4
    assert (ctx[..., 64:] - out_g.hidden_states[-2]).abs().max().item() <= 1e-4
    assert (pooled - out_g.text_embeds).abs().max().item() <= 1e-4
    assert out_g.text_embeds.abs().mean() > 0.1


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """vocab.json and merges.txt for transformers' CLIPTokenizer, from the BPE file bundled with open_clip."""
    from open_clip.tokenizer import default_bpe
    d = tmp_path_factory.mktemp("clip_tok")
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1:49152 - 256 - 2 + 1]) + "\n")
    vocab = dict(bpe_tokenizer().encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (d / "vocab.json").write_text(json.dumps(vocab))
    return str(d / "vocab.json"), str(d / "merges.txt")


def test_tokenization_pads_clip_l_with_end_token_and_bigg_with_zero(small, bpe_files):
    """CLIP-L as SGM's FrozenCLIPEmbedder (transformers, padded with <|endoftext|> 49407); bigG as
    FrozenOpenCLIPEmbedder2 (open_clip.tokenize, padded with 0)."""
    import open_clip
    from transformers import CLIPTokenizer
    text = small[2].text
    ref = CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>")(PROMPTS, padding="max_length", max_length=77,
                                                              truncation=True, return_tensors="pt").input_ids
    assert torch.equal(text.clip_l.tokenize(PROMPTS), ref)
    # diffusers' tokenizer_2 pads with "!" (id 0) but then also reads a "!" in the prompt as padding: "4k!!" differs
    after_end = torch.arange(77) > (ref == EOT).int().argmax(dim=1, keepdim=True)
    assert torch.equal(text.clip_g.tokenize(PROMPTS), ref.masked_fill(after_end, 0))
    assert torch.equal(text.clip_g.tokenize(PROMPTS), open_clip.tokenizer.tokenize(PROMPTS))
    assert (text.clip_l.tokenize("")[0, 2:] == EOT).all() and (text.clip_g.tokenize("")[0, 2:] == 0).all()


# ---- the pipeline and generate --------------------------------------------------------------------

def test_conditioned_unet_matches_diffusers_sdxl_pipeline(small, bpe_files):
    """Context, pooled text, size ids and the empty-negative zeros as StableDiffusionXLPipeline makes them, through
    the same U-Net: our denoiser's conditioning gives diffusers' output."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from transformers import CLIPTokenizer
    _, cfg, models = small
    file = state_dict_for(models)
    params = dataclasses.asdict(cfg.unet) | {"num_classes": "sequential", "transformer_depth": [0, 1, 2]}
    del params["num_heads"]
    original = {"model": {"params": {"network_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 2]}}}}}}
    ucfg = create_unet_diffusers_config_from_ldm(original, file)
    # diffusers infers text_time only for SDXL's context widths (2048, 1280); this small model has 96.
    ucfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None, norm_num_groups=8)
    d_unet = UNet2DConditionModel(**ucfg).eval()
    d_unet.load_state_dict(convert_ldm_unet_checkpoint(file, ucfg), strict=True)
    hf_l, hf_g = hf_text_encoders(file)
    ref = StableDiffusionXLPipeline(
        vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=8), text_encoder=hf_l, text_encoder_2=hf_g,
        tokenizer=CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>", model_max_length=77),
        tokenizer_2=CLIPTokenizer(*bpe_files, pad_token="!", model_max_length=77), unet=d_unet,
        scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    pipe = Pipeline(models, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([700.0, 700.0])
    for negative in (None, "an ugly dog"):
        with torch.no_grad():
            cond, uncond, pooled, pooled_uncond = ref.encode_prompt(
                "a cat on a hill", device="cpu", do_classifier_free_guidance=True, negative_prompt=negative)
            time_ids = ref._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32,
                                             text_encoder_projection_dim=32)
            want = d_unet(x, t, encoder_hidden_states=torch.cat([uncond, cond]),
                          added_cond_kwargs={"text_embeds": torch.cat([pooled_uncond, pooled]),
                                             "time_ids": time_ids.repeat(2, 1)}).sample
            den = pipe.denoiser(["a cat on a hill"], [negative or ""], 5.0, size=(64, 96))
            got = pipe.unet(x, t, den.context, den.y)
        assert (den.context - torch.cat([uncond, cond])).abs().max().item() <= 1e-4
        assert want.abs().mean() > 0.1 and (got - want).abs().max().item() <= 1e-4


def test_pipeline_micro_conditioning_zero_negative_and_fp32_vae(small):
    from diffusers.models.embeddings import Timesteps
    _, cfg, models = small
    pipe = Pipeline(models, device="cpu", dtype=torch.float32)
    den = pipe.denoiser(["a cat"], [""], 5.0, size=(64, 96))
    _, pooled = models.text.encode_with_pooled(["a cat"])
    sizes = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.tensor([64.0, 96, 0, 0, 64, 96]))
    assert den.y.shape == (2, 1568) and den.context.shape == (2, 77, 96)
    assert torch.allclose(den.y[1], torch.cat([pooled[0], sizes.flatten()]), atol=1e-6)
    assert den.y[0, :32].abs().max() == 0 and den.context[0].abs().max() == 0  # empty negative: zeros (SGM)
    assert torch.equal(den.y[0, 32:], den.y[1, 32:])
    assert pipe.denoiser(["a cat"], ["ugly"], 5.0).context[0].abs().max() > 0
    half = Pipeline(build_models(cfg), device="cpu", dtype=torch.float16)
    assert half.vae_dtype == torch.float32 and next(half.vae.parameters()).dtype == torch.float32
    assert next(half.unet.parameters()).dtype == torch.float16


def test_sdxl_layout_file_end_to_end(small, capsys):
    """A random-valued file in the official SDXL layout (no latentdiff metadata) through `generate`."""
    from safetensors.torch import save_file

    from latentdiff.generate import main
    d, cfg, models = small
    state = {k: v.contiguous() for k, v in state_dict_for(models).items()}
    state[SDXL_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as official files have
    path = d / "sdxl-small.safetensors"
    save_file(state, str(path))

    def run(*args):
        rc = main([str(a) for a in args])
        return rc, capsys.readouterr()
    out = d / "out.png"
    rc, io = run("a cat", "--checkpoint", path, "--config", d / "small.yaml", "--steps", 2, "--seed", 3, "-o", out)
    assert rc == 0, io.err
    image = Image.open(out)
    assert image.size == (64, 64) and "Steps: 2" in image.info["parameters"]
    pipe = Pipeline.from_checkpoint(path, device="cpu", config=cfg)
    assert isinstance(pipe.text, DualTextEncoder)
    for part in ("unet", "vae", "text"):
        got, want = getattr(pipe, part).state_dict(), getattr(models, part).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # Without --config the keys say SDXL: the full-size preset is built, and the sizes cannot match.
    rc, io = run("a cat", "--checkpoint", path, "--steps", 1, "-o", d)
    assert rc == 2 and "sdxl-base" in io.err and "mis-shaped" in io.err and len(io.err.strip().splitlines()) == 1

    # Our own files keep the official layout (readable by other SDXL tools) and add the config.
    ours = d / "ours.safetensors"
    save_models(ours, cfg, models.unet, models.vae, models.text)
    back, metadata = load_file(ours)
    assert back.keys() == state.keys() - {SDXL_L_PREFIX + "text_model.embeddings.position_ids"}
    assert json.loads(metadata["latentdiff_config"])["text2"]["width"] == 32
    loaded = load_models(ours)  # the config from the metadata, no --config
    got, want = loaded.text.state_dict(), models.text.state_dict()
    assert loaded.config == cfg and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sdxl_layout_file_in_half_matches_float32(small, dtype):
    """The official-layout file in fp16 / bf16 on the CPU: same seeds, final latents within the half-precision
    bounds of tests/test_half_precision.py (fp16 keeps the VAE in float32, as diffusers' force_upcast does)."""
    from safetensors.torch import save_file
    d, cfg, models = small
    path = d / f"sdxl-{dtype}.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict_for(models).items()}, str(path))
    final = {}
    for dt in ("fp32", dtype):
        pipe = Pipeline.from_checkpoint(path, device="cpu", dtype=dt, config=cfg)
        res = pipe("a cat", negative_prompt="blurry", steps=2, seed=4, guidance=5.0, return_latents=True,
                   progress=False)
        assert res.images[0].size == (64, 64)
        final[dt] = res.latents
        if dt == "fp16":
            assert pipe.vae_dtype == torch.float32 and next(pipe.unet.parameters()).dtype == torch.float16
    err = ((final[dtype] - final["fp32"]).norm() / final["fp32"].norm()).item()
    assert err <= {"fp16": 1e-2, "bf16": 5e-2}[dtype], err


# ---- files written by diffusers' scripts/convert_diffusers_to_original_sdxl.py -----------------------
# It writes text_encoder (CLIPTextModel) as it is under conditioner.embedders.0.transformer., and text_encoder_2
# (CLIPTextModelWithProjection) under conditioner.embedders.1.model.: each layer's q/k/v concatenated into
# in_proj_*, names relabelled (text_model.encoder.layers. -> transformer.resblocks., layer_norm1/2 -> ln_1/2,
# .fc1./.fc2. -> .c_fc./.c_proj., .self_attn -> .attn, text_model.final_layer_norm. -> ln_final.,
# text_model.embeddings.{token_embedding.weight, position_embedding.weight} -> token_embedding.weight,
# positional_embedding), and anything else under its own name: the projection as transformers' Linear
# (text_projection.weight, (out, in)), position_ids; no logit_scale (transformers' text model has none).

def sdxl_script_text_encoders(hf_l, hf_g) -> dict:
    """convert_diffusers_to_original_sdxl.py's text-encoder part, from the two transformers models' weights as a
    diffusers SDXL folder holds them (names under text_model., position_ids saved by transformers < 4.31)."""
    def saved(model):
        state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                 for k, v in model.state_dict().items()}
        return state | {"text_model.embeddings.position_ids": torch.arange(77)[None]}
    renames = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
               ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
               ("text_model.final_layer_norm.", "ln_final."),
               ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding")]
    g = fused_qkv_renamed(saved(hf_g), renames)
    return ({SDXL_L_PREFIX + k: v for k, v in saved(hf_l).items()} | {SDXL_G_PREFIX + k: v for k, v in g.items()})


def fused_qkv_renamed(state: dict, renames: list[tuple[str, str]]) -> dict:
    """A transformers CLIP text model's weights under open_clip's names, as diffusers' convert-to-original scripts
    write them: each layer's q/k/v projections concatenated into in_proj_*, every name relabelled by `renames` in
    order."""
    out, qkv = {}, {}
    for key, value in state.items():
        if m := re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for src, dst in renames:
            key = key.replace(src, dst)
        out[key] = value
    for (stem, kind), parts in qkv.items():
        for src, dst in renames:
            stem = stem.replace(src, dst)
        out[f"{stem}.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def test_files_from_diffusers_sdxl_script_load_and_without_bigg_projection_are_refused(small):
    """No logit_scale, bigG's projection as text_projection.weight and position_ids under diffusers' names: the
    file loads and gives the same context and pooled embedding; without the projection (the pooled output needs
    it) it is refused in one line that names it."""
    from safetensors.torch import save_file
    d, cfg, models = small
    ours = state_dict_for(models)
    text = sdxl_script_text_encoders(*hf_text_encoders(ours))
    assert SDXL_G_PREFIX + "text_projection.weight" in text and SDXL_G_PREFIX + "logit_scale" not in text
    assert SDXL_G_PREFIX + "transformer.resblocks.2.attn.in_proj_weight" in text
    state = {k: v.contiguous() for k, v in ours.items() if not k.startswith("conditioner.")} | text
    path = d / "from-diffusers.safetensors"
    save_file(state, str(path))
    got = load_models(path, config=cfg)
    with torch.no_grad():
        want_ctx, want_pooled = models.text.eval().encode_with_pooled(PROMPTS[:3])
        ctx, pooled = got.text.encode_with_pooled(PROMPTS[:3])
    assert torch.equal(ctx, want_ctx) and torch.equal(pooled, want_pooled)
    assert all(torch.equal(v, models.unet.state_dict()[k]) for k, v in got.unet.state_dict().items())

    del state[SDXL_G_PREFIX + "text_projection.weight"]
    save_file(state, str(d / "no-projection.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_models(d / "no-projection.safetensors", config=cfg)
    assert "\n" not in str(e.value) and "conditioner.embedders.1.model.text_projection" in str(e.value)
    assert "pooled" in str(e.value)
