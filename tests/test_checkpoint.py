"""Checkpoints: the official SD 1.x / 2.x layouts (tests/data manifests), safety, errors, our own format."""
import dataclasses
import gzip
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.io.checkpoint import CheckpointError, Models, _meta_models, detect_config, ema_key, load_file, load_models, save_models, split_state_dict, state_dict_for
from latentdiff.io.config import load_model_config

ROOT = Path(__file__).resolve().parent.parent
PRESET = {"sd15": "sd15", "sd21": "sd21-base"}


def manifest(name):
    with gzip.open(ROOT / "tests" / "data" / f"{name}_layout.json.gz") as f:
        return json.load(f)


def meta_state(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# ---- full size, on the meta device ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_modules_have_exactly_the_manifest_keys_and_shapes(name):
    m = manifest(name)
    models = _meta_models(load_model_config(ROOT / "configs" / f"{PRESET[name]}.yaml"))
    file_state = meta_state({**m["tensors"], **m["optional_tensors"]})
    parts, unexpected = split_state_dict(file_state, models.unet.state_dict().keys())
    assert unexpected == []
    for part in ("unet", "vae", "text"):
        want = {k: tuple(v.shape) for k, v in getattr(models, part).state_dict().items()}
        have = {k: tuple(v.shape) for k, v in parts[part].items()}
        assert want == have, part
    if name == "sd21":  # open_clip names throughout: our own layout is the SD2 file layout, key for key
        ours = {k: list(v.shape) for k, v in state_dict_for(models).items()}
        assert ours == m["tensors"]
    # The EMA copies of non-pruned training files are named by dropping the dots of each U-Net key.
    assert {ema_key(k) for k in models.unet.state_dict()} | {"model_ema.decay", "model_ema.num_updates"} \
        == set(m["ema_tensors"])


def test_detect_sd1_sd2_and_prediction_from_keys():
    sd1, sd2 = meta_state(manifest("sd15")["tensors"]), meta_state(manifest("sd21")["tensors"])
    assert detect_config(sd1, {}) == load_model_config(ROOT / "configs" / "sd15.yaml")
    assert detect_config(sd2, {}) == load_model_config(ROOT / "configs" / "sd21-base.yaml")
    v = detect_config(sd2, {}, prediction="v_prediction")
    assert v == load_model_config(ROOT / "configs" / "sd21-v.yaml") and v.image_size == 768
    assert detect_config(sd1, {}, prediction="v_prediction").diffusion.prediction == "v_prediction"
    inpaint = dict(sd1, **{"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 9, 3, 3,
                                                                                       device="meta")})
    assert detect_config(inpaint, {}).unet.in_channels == 9
    with pytest.raises(CheckpointError, match="prediction must be one of"):
        detect_config(sd1, {}, prediction="v")
    with pytest.raises(CheckpointError, match="no text-encoder keys"):
        detect_config({k: v for k, v in sd1.items() if not k.startswith("cond_stage_model")}, {})


# ---- reduced size, real tensors --------------------------------------------------------------------
# Every SD width divided by 8 (vocab cut to 1000) keeps the manifest's key list and topology while making
# a whole checkpoint about 30 MB; the shapes follow from the manifest by this map alone.

SHRINK = {320: 40, 640: 80, 1280: 160, 960: 120, 1920: 240, 2560: 320, 5120: 640, 10240: 1280, 128: 16, 256: 32,
          512: 64, 768: 96, 3072: 384, 1024: 128, 4096: 512, 49408: 1000}


def reduced_config(name):
    cfg = load_model_config(ROOT / "configs" / f"{PRESET[name]}.yaml")
    unet = dataclasses.replace(cfg.unet, model_channels=40, context_dim=SHRINK[cfg.unet.context_dim], norm_groups=8,
                               num_head_channels=-1 if cfg.unet.num_head_channels == -1 else 8)
    vae = dataclasses.replace(cfg.vae, ch=16, norm_groups=8)
    text = dataclasses.replace(cfg.text, width=SHRINK[cfg.text.width], vocab_size=1000,
                               embed_dim=SHRINK.get(cfg.text.embed_dim, 0))
    return dataclasses.replace(cfg, unet=unet, vae=vae, text=text)


def reduced_state(name, seed=0, ema=False):
    m = manifest(name)
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn([SHRINK.get(d, d) for d in s], generator=g) * 0.05).half()
             for k, s in m["tensors"].items()}
    state.update({k: torch.linspace(0.001, 0.99, 1000) for k in m["schedule_buffers"]})
    state.update({k: torch.arange(77.0)[None] for k in m["optional_tensors"]})  # stored as float by some merges
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0, dtype=torch.int32)
    if ema:  # the manifest's EMA names, each given the shape of the U-Net weight whose dots it dropped
        flat = {"model_ema." + k[len("model."):].replace(".", ""): k
                for k in m["tensors"] if k.startswith("model.diffusion_model.")}
        for k in m["ema_tensors"]:
            if k not in state:
                state[k] = (torch.randn(state[flat[k]].shape, generator=g) * 0.05).half()
    return state


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15") / "sd15-reduced.safetensors"
    state = reduced_state("sd15")
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_reduced_checkpoint_from_manifest_loads_strict(name, tmp_path, sd15_file):
    if name == "sd15":
        path, state = sd15_file
    else:
        path, state = tmp_path / "sd21-reduced.safetensors", reduced_state("sd21", seed=1)
        save_file(state, str(path))
    models = load_models(path, config=reduced_config(name))
    assert isinstance(models, Models)
    for module in (models.unet, models.vae, models.text):
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.is_meta for p in module.parameters())
        assert not any(b.is_meta for b in module.buffers())
    unet_sd, vae_sd, text = models.unet.state_dict(), models.vae.state_dict(), models.text
    for k in ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "out.2.weight", "time_embed.2.bias"):
        assert torch.equal(unet_sd[k], state["model.diffusion_model." + k].float())
    assert torch.equal(vae_sd["decoder.up.3.upsample.conv.weight"],
                       state["first_stage_model.decoder.up.3.upsample.conv.weight"].float())
    if name == "sd15":
        hf = "cond_stage_model.transformer.text_model."
        qkv = [state[f"{hf}encoder.layers.11.self_attn.{c}_proj.bias"] for c in "qkv"]
        assert torch.equal(text.transformer.resblocks[11].attn.in_proj_bias, torch.cat(qkv).float())
        assert torch.equal(text.positional_embedding, state[hf + "embeddings.position_embedding.weight"].float())
    else:
        assert torch.equal(text.text_projection, state["cond_stage_model.model.text_projection"].float())
    # A forward pass through the loaded modules runs.
    with torch.no_grad():
        ctx = models.text(models.text.tokenize(["a"]).clamp(max=999))
        out = models.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), ctx)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_load_in_half_precision_and_ckpt_wrapper(tmp_path, sd15_file):
    _, state = sd15_file
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, path)
    sd, meta = load_file(path)
    assert meta == {"global_step": "470000"} and sd.keys() == state.keys()
    models = load_models(path, dtype=torch.bfloat16, config=reduced_config("sd15"))
    assert {p.dtype for m in (models.unet, models.vae, models.text) for p in m.parameters()} == {torch.bfloat16}


def test_old_non_zip_torch_files_and_flat_ckpts_load(tmp_path):
    legacy = tmp_path / "legacy.ckpt"  # cannot be memory-mapped: read without mmap, still weights_only
    torch.save({"state_dict": {"a": torch.arange(3.0)}, "global_step": 7}, legacy, _use_new_zipfile_serialization=False)
    sd, meta = load_file(legacy)
    assert torch.equal(sd["a"], torch.arange(3.0)) and meta == {"global_step": "7"}
    flat = tmp_path / "flat.pt"
    torch.save({"b": torch.ones(2), "note": "ignored"}, flat)
    sd, meta = load_file(flat)
    assert list(sd) == ["b"] and torch.equal(sd["b"], torch.ones(2)) and meta == {}


def test_missing_key_is_a_clear_error(tmp_path, sd15_file):
    _, state = sd15_file
    gone = "model.diffusion_model.middle_block.1.proj_out.weight"
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != gone}, str(path))
    with pytest.raises(CheckpointError) as e:
        load_models(path, config=reduced_config("sd15"))
    msg = str(e.value)
    assert str(path) in msg and "1 missing keys" in msg and gone in msg and "0 unexpected" in msg
    assert "\n" not in msg


def test_misshaped_and_unexpected_keys_are_clear_errors(tmp_path, sd15_file):
    _, state = sd15_file
    bad = dict(state)
    bad["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    bad["model.diffusion_model.extra.weight"] = torch.zeros(1)
    bad["some_other_thing"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError) as e:
        load_models(path, config=reduced_config("sd15"))
    msg = str(e.value)
    assert "2 unexpected keys" in msg and "some_other_thing" in msg and "model.diffusion_model.extra.weight" in msg
    assert "1 mis-shaped keys (first_stage_model.quant_conv.weight (file [8, 8, 3, 3], model [8, 8, 1, 1]))" in msg
    # The full-size preset detected from an SD1 file of other widths: every weight mis-shaped, listed briefly.
    with pytest.raises(CheckpointError, match=r"does not match the sd15 model: 0 missing keys, 0 unexpected keys, "
                                              r"\d+ mis-shaped keys \(.*, \.\.\.\)"):
        load_models(sd15_file[0])


def test_ema_weights_load_when_asked(tmp_path):
    state = reduced_state("sd21", seed=2, ema=True)
    path = tmp_path / "ema.safetensors"
    save_file(state, str(path))
    cfg = reduced_config("sd21")
    plain, ema = load_models(path, config=cfg), load_models(path, config=cfg, ema=True)
    k = "output_blocks.5.1.proj_in.weight"
    assert torch.equal(plain.unet.state_dict()[k], state["model.diffusion_model." + k].float())
    assert torch.equal(ema.unet.state_dict()[k], state["model_ema.diffusion_modeloutput_blocks51proj_inweight"].float())
    assert torch.equal(ema.vae.decoder.conv_out.weight, plain.vae.decoder.conv_out.weight)
    no_ema = tmp_path / "no-ema.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("model_ema.diffusion")}, str(no_ema))
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_models(no_ema, config=cfg, ema=True)


# ---- broken and hostile files ----------------------------------------------------------------------

def test_truncated_files_name_the_file(tmp_path, sd15_file):
    path, _ = sd15_file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable safetensors file"):
        load_file(cut)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt could not be read"):
        load_file(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        (tmp_path / "w.gguf").write_bytes(b"x")
        load_file(tmp_path / "w.gguf")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "hook": Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_models(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    # The payload is real: plain unpickling would have run it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()


# ---- our own format --------------------------------------------------------------------------------

def test_save_load_round_trip_keeps_weights_and_config(tmp_path):
    cfg = dataclasses.replace(load_model_config(ROOT / "configs" / "tiny.yaml"), name="roundtrip")
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, prediction="v_prediction"))
    torch.manual_seed(0)
    from latentdiff.io.checkpoint import build_models
    src = build_models(cfg)
    with torch.no_grad():
        for m in (src.unet, src.vae, src.text):
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    path = tmp_path / "out" / "model.safetensors"
    save_models(path, cfg, src.unet, src.vae, src.text, extra_metadata={"step": 12})
    assert os.listdir(path.parent) == ["model.safetensors"]  # no temp file left behind
    _, meta = load_file(path)
    assert meta["step"] == "12" and json.loads(meta["latentdiff_config"])["name"] == "roundtrip"
    back = load_models(path)
    assert back.config == cfg
    for part in ("unet", "vae", "text"):
        a, b = getattr(src, part).state_dict(), getattr(back, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = tmp_path / "half.safetensors"
    save_models(half, cfg, src.unet, src.vae, src.text, dtype=torch.float16)
    w = load_models(half).unet.out[2].weight
    assert w.dtype == torch.float32 and torch.equal(w, src.unet.out[2].weight.half().float())
    with pytest.raises(CheckpointError, match=r"name it \*\.safetensors"):
        save_models(tmp_path / "m.ckpt", cfg, src.unet, src.vae, src.text)


def test_convert_command_writes_fp16_with_config_changes(tmp_path, tiny_checkpoint, capsys):
    from latentdiff.checkpoint import main
    out = tmp_path / "half.safetensors"
    assert main([str(tiny_checkpoint), str(out), "--set", "sampling.guidance=3", "sampling.steps=12"]) == 0
    src, got = load_models(tiny_checkpoint), load_models(out)
    assert got.config == dataclasses.replace(src.config, sampling=dataclasses.replace(
        src.config.sampling, guidance=3.0, steps=12))
    state, _ = load_file(out)
    assert {v.dtype for v in state.values()} == {torch.float16}
    for part in ("unet", "vae", "text"):
        a, b = getattr(src, part).state_dict(), getattr(got, part).state_dict()
        assert all(torch.equal(b[k], a[k].half().float()) for k in a), part
    assert main([str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors")]) == 2
    assert main([str(tiny_checkpoint), str(tmp_path / "y.safetensors"), "--set", "sampling.stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not found" in err[0] and "stepz" in err[1], err


def test_convert_with_vae_takes_a_fine_tuned_decoder_and_refuses_another_encoder(tmp_path, tiny_checkpoint, capsys):
    """--vae FILE: the output is SRC with FILE's VAE, allowed only when FILE's encoder is SRC's bit for bit."""
    from latentdiff.checkpoint import main
    from latentdiff.io.checkpoint import save_models
    src = load_models(tiny_checkpoint)
    tuned = load_models(tiny_checkpoint)
    with torch.no_grad():
        for p in tuned.vae.decoder.parameters():
            p.add_(0.01)
    tuned_path = tmp_path / "tuned.safetensors"
    save_models(tuned_path, tuned.config, tuned.unet, tuned.vae, tuned.text)
    out = tmp_path / "merged.safetensors"
    assert main([str(tiny_checkpoint), str(out), "--vae", str(tuned_path), "--dtype", "fp32"]) == 0
    got = load_models(out)
    for k, v in tuned.vae.state_dict().items():
        assert torch.equal(got.vae.state_dict()[k], v), k
    assert any(not torch.equal(got.vae.state_dict()[k], v) for k, v in src.vae.state_dict().items())
    for part in ("unet", "text"):
        a, b = getattr(src, part).state_dict(), getattr(got, part).state_dict()
        assert all(torch.equal(b[k], a[k]) for k in a), part

    with torch.no_grad():
        tuned.vae.encoder.conv_in.weight.add_(0.01)
    save_models(tuned_path, tuned.config, tuned.unet, tuned.vae, tuned.text)
    assert main([str(tiny_checkpoint), str(tmp_path / "bad.safetensors"), "--vae", str(tuned_path)]) == 2
    other = dataclasses.replace(src.config, vae=dataclasses.replace(src.config.vae, scale_factor=0.5))
    save_models(tuned_path, other, src.unet, src.vae, src.text)
    assert main([str(tiny_checkpoint), str(tmp_path / "bad.safetensors"), "--vae", str(tuned_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "encoder" in err[0] and "scale factor" in err[1], err
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("depth", [5, 6, 500])
def test_stored_configs_nested_too_deep_are_refused_by_the_depth_check(depth, tiny_config):
    """A stored config more than 4 containers deep (ours is 3: the config, unet, channel_mult) is refused by the
    depth check itself, in one line, before from_dict or any recursion sees it."""
    from latentdiff.io.checkpoint import CONFIG_KEY
    from latentdiff.io.config import to_dict
    stored = to_dict(tiny_config)
    nest = stored["unet"]["channel_mult"]
    for _ in range(depth - 3):
        nest = [nest]
    stored["unet"]["channel_mult"] = nest
    with pytest.raises(CheckpointError) as e:
        detect_config({}, {CONFIG_KEY: json.dumps(stored)}, name="x.safetensors")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("x.safetensors: the stored latentdiff config is invalid (")
    assert str(e.value).endswith("nested more than 4 levels deep)")
    stored["unet"]["channel_mult"] = to_dict(tiny_config)["unet"]["channel_mult"]  # depth 3: the config loads
    assert detect_config({}, {CONFIG_KEY: json.dumps(stored)}) == tiny_config


# ---- files written by diffusers' conversion scripts ------------------------------------------------
# scripts/convert_diffusers_to_original_stable_diffusion.py reads a diffusers SD 2.x folder, whose text_encoder is
# transformers' CLIPTextModel with 23 of OpenCLIP-H's 24 layers (no projection, no logit_scale), and writes it
# under cond_stage_model.model.: "transformer." is put before every name, each layer's q/k/v are concatenated into
# in_proj_*, and the names are relabelled (text_model.encoder.layers. -> resblocks., layer_norm1/2 -> ln_1/2,
# .fc1./.fc2. -> .c_fc./.c_proj., .self_attn -> .attn, transformer.text_model.final_layer_norm. -> ln_final.,
# transformer.text_model.embeddings.{token_embedding.weight, position_embedding.weight} -> token_embedding.weight,
# positional_embedding); anything else (position_ids) keeps its name. The file is torch.save({"state_dict": ...}).

def diffusers_sd2_text_encoder(state):
    """The diffusers SD 2.x text_encoder weights of a file, as diffusers' own converter makes them (23 layers)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    width = state["cond_stage_model.model.ln_final.weight"].shape[0]
    model = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=23,
                                         num_attention_heads=16, hidden_act="gelu", vocab_size=1000,
                                         bos_token_id=0, eos_token_id=2, pad_token_id=1))
    hf = convert_open_clip_checkpoint(model, state)
    assert not any(k.startswith("text_model.encoder.layers.23.") for k in hf)
    return hf | {"text_model.embeddings.position_ids": torch.arange(77)[None]}  # saved by transformers < 4.31


def sd2_script_text_encoder(hf: dict) -> dict:
    """convert_diffusers_to_original_stable_diffusion.py's text-encoder mapping for an SD 2.x model."""
    from test_sdxl import fused_qkv_renamed
    renames = [("transformer.text_model.final_layer_norm.", "ln_final."),  # whole names first, as the script does
               ("transformer.text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
               ("transformer.text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.encoder.layers.", "resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn")]
    out = fused_qkv_renamed({"transformer." + k: v for k, v in hf.items()}, renames)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


@pytest.mark.parametrize("how", ["script", "dropped"])
def test_sd2_files_without_what_conditioning_never_uses_load_with_the_same_outputs(how, tmp_path):
    """An SD 2.x file as diffusers' SD 2.x script writes it (23 text layers, no text_projection, no logit_scale,
    position_ids under diffusers' name, a .ckpt), and one with only text_projection and logit_scale dropped, load
    and condition exactly as the full file does."""
    state = reduced_state("sd21", seed=3)
    full_path = tmp_path / "full.safetensors"
    save_file(state, str(full_path))
    if how == "script":
        text = sd2_script_text_encoder(diffusers_sd2_text_encoder(state))
        assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in text
        assert "cond_stage_model.model.transformer.text_model.embeddings.position_ids" in text
        other = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")} | text
        path = tmp_path / "converted.ckpt"
        torch.save({"state_dict": other}, path)
    else:
        other = {k: v for k, v in state.items()
                 if k not in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")}
        path = tmp_path / "dropped.safetensors"
        save_file(other, str(path))
    cfg = reduced_config("sd21")
    full, got = load_models(full_path, config=cfg), load_models(path, config=cfg)
    tokens = full.text.tokenize(["a red square", "an astronaut riding a horse"]).clamp(max=999)
    with torch.no_grad():
        assert torch.equal(got.text(tokens), full.text(tokens))
    assert all(torch.equal(v, full.unet.state_dict()[k]) for k, v in got.unet.state_dict().items())
    assert got.config.text.embed_dim == 0 and not hasattr(got.text, "text_projection")
    assert got.config.text.layers == (23 if how == "script" else 24)


# ---- inpainting files: a 9-channel conv_in, found from the weights ------------------------------------------

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def sdxl_small_state(tmp_path):
    """test_sdxl's smallest SDXL, as an official-layout file's tensors, and its yaml (4 input channels)."""
    from test_sdxl import SMALL
    from latentdiff.io.checkpoint import build_models
    (tmp_path / "xl.yaml").write_text(SMALL)
    cfg = load_model_config(tmp_path / "xl.yaml")
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in state_dict_for(build_models(cfg)).items()}, cfg


def test_sd2_and_sdxl_inpainting_files_are_detected_from_conv_in(tmp_path):
    """A single file whose conv_in takes 9 channels (latents, mask, masked-picture latents) is an inpainting model,
    for the SD 2.x and SDXL layouts as for SD 1.x: at full size without a config (the presets' U-Nets get 9 input
    channels and then take the file's keys), and at the smallest sizes with the yaml of the ordinary model."""
    from latentdiff.pipeline import Pipeline
    sd2 = meta_state(manifest("sd21")["tensors"])
    xl = state_dict_for(_meta_models(load_model_config(ROOT / "configs" / "sdxl-base.yaml")))
    for state, preset in ((sd2, "sd21-base"), (xl, "sdxl-base")):
        state = dict(state, **{CONV_IN: torch.empty(320, 9, 3, 3, device="meta")})
        cfg = detect_config(state, {})
        assert cfg.name == preset and cfg.unet.in_channels == 9 and cfg.unet.out_channels == 4
        unet = _meta_models(cfg).unet.state_dict()
        have = split_state_dict(state, unet.keys())[0]["unet"]
        assert {k: tuple(v.shape) for k, v in have.items()} == {k: tuple(v.shape) for k, v in unet.items()}
    g = torch.Generator().manual_seed(5)
    sd2 = reduced_state("sd21", seed=2)
    sd2[CONV_IN] = (torch.randn(40, 9, 3, 3, generator=g) * 0.05).half()
    xl, xl_cfg = sdxl_small_state(tmp_path)
    xl[CONV_IN] = torch.randn(32, 9, 3, 3, generator=g) * 0.05
    from PIL import Image
    picture = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 16, 16))
    for name, state, cfg in (("sd2", sd2, reduced_config("sd21")), ("sdxl", xl, xl_cfg)):
        path = tmp_path / f"{name}-inpainting.safetensors"
        save_file(state, str(path))
        assert cfg.unet.in_channels == 4
        pipe = Pipeline.from_checkpoint(path, device="cpu", config=cfg)
        assert pipe.inpainting_model and pipe.config.unet.in_channels == 9, name
        assert torch.equal(pipe.unet.state_dict()["input_blocks.0.0.weight"], state[CONV_IN].float())
        if name == "sdxl":  # (the reduced SD 2 text encoder's 1000 tokens cannot encode a prompt)
            out = pipe("a cat", init_image=picture, mask=mask, steps=1, progress=False).images[0]
            assert out.crop((40, 40, 64, 64)).tobytes() == picture.crop((40, 40, 64, 64)).tobytes()
        else:
            with torch.no_grad():
                ctx = pipe.text(pipe.text.tokenize(["a"]).clamp(max=999))
                assert pipe.unet(torch.randn(1, 9, 8, 8), torch.tensor([10]), ctx).shape == (1, 4, 8, 8)
