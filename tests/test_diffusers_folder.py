"""diffusers-format model folders (model_index.json, unet/, vae/, text_encoder[_2]/, tokenizer/, scheduler/), loaded
offline: the folders are written here by diffusers' own save_pretrained from weights its single-file converters made,
and must give exactly the model loaded from the single file."""
import dataclasses

import pytest
import torch

from latentdiff.io.checkpoint import load_models, save_models, state_dict_for
from latentdiff.io.diffusers_folder import is_diffusers_folder, load_diffusers_folder
from test_lora import SD1_SMALL, diffusers_unet, hf_text, sd1, sdxl  # noqa: F401 - fixtures
from test_sdxl import bpe_files, hf_text_encoders  # noqa: F401 - fixture


def diffusers_vae(models):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    v = models.config.vae
    boc = [v.ch * m for m in v.ch_mult]
    vae = AutoencoderKL(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
                        block_out_channels=boc, layers_per_block=v.num_res_blocks, norm_num_groups=v.norm_groups,
                        down_block_types=["DownEncoderBlock2D"] * len(boc), up_block_types=["UpDecoderBlock2D"] * len(boc),
                        scaling_factor=v.scale_factor, force_upcast=v.force_upcast, sample_size=v.resolution)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state_dict_for(models), vae.config), strict=True)
    return vae


def write_folder(models, folder, bpe_files, sdxl=False):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>", model_max_length=77)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   prediction_type="v_prediction" if not sdxl else "epsilon")
    common = dict(vae=diffusers_vae(models), unet=diffusers_unet(models, sdxl), scheduler=sched, tokenizer=tok)
    if sdxl:
        hf_l, hf_g = hf_text_encoders(state_dict_for(models))
        pipe = StableDiffusionXLPipeline(text_encoder=hf_l, text_encoder_2=hf_g, tokenizer_2=tok,
                                         add_watermarker=False, **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=hf_text(models), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **common)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_folder_loads_the_model_of_its_single_file(which, sd1, sdxl, bpe_files, tmp_path):
    is_xl = which == "sdxl"
    _, models = sdxl if is_xl else sd1
    single = tmp_path / "single.safetensors"
    save_models(single, models.config, models.unet, models.vae, models.text)
    want = load_models(single)
    folder = write_folder(models, tmp_path / "folder", bpe_files, is_xl)
    assert is_diffusers_folder(folder) and (folder / "tokenizer").is_dir()
    got = load_diffusers_folder(folder)
    assert got.config.unet == want.config.unet or dataclasses.replace(
        got.config.unet, attention_resolutions=want.config.unet.attention_resolutions) == want.config.unet
    assert got.config.vae == want.config.vae and got.config.text == want.config.text
    assert got.config.text2 == want.config.text2
    # the scheduler's prediction type travels with a folder (a single file cannot carry it)
    assert got.config.diffusion.prediction == ("epsilon" if is_xl else "v_prediction")
    for part in ("unet", "vae", "text"):
        a, b = getattr(got, part).state_dict(), getattr(want, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("logit_scale")), part
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(got.vae.decode(x), want.vae.decode(x))
        if is_xl:
            assert torch.equal(got.text.encode(["a cat"]), want.text.encode(["a cat"]))
        else:  # the small SD 1.x model has a 1000-token vocabulary
            tokens = torch.randint(0, 1000, (2, 77))
            assert torch.equal(got.text(tokens), want.text(tokens))


def test_pipeline_and_generate_take_a_folder(sdxl, bpe_files, tmp_path, capsys):
    from latentdiff.generate import main
    from latentdiff.pipeline import Pipeline
    _, models = sdxl
    folder = write_folder(models, tmp_path / "folder", bpe_files, sdxl=True)
    pipe = Pipeline.from_checkpoint(folder, device="cpu")
    assert pipe.config.text2 is not None and pipe.checkpoint_path == str(folder)
    assert main(["a cat", "--checkpoint", str(folder), "--steps", "1", "--seed", "1", "-W", "64", "-H", "64", "-o",
                 str(tmp_path / "a.png")]) == 0
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(["a cat", "--checkpoint", str(folder), "--steps", "1", "-o", str(tmp_path / "b.png")]) == 2
    assert "has no weights" in capsys.readouterr().err
