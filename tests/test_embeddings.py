"""Textual-inversion embeddings, used by file name in the prompt: A1111 .pt (string_to_param, read with
weights_only=True), .safetensors (emb_params; SDXL clip_l / clip_g). Reference: diffusers' load_textual_inversion,
which adds the vectors as new tokens of transformers' tokenizer and CLIP text model."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.io.adapters import AdapterError, load_embeddings, read_embedding
from latentdiff.io.checkpoint import build_models, open_clip_to_hf_clip
from latentdiff.io.config import load_model_config
from latentdiff.models.text_encoder import TextConfig, TextEncoder
from test_sdxl import SMALL, bpe_files, hf_keys, hf_text_encoders, state_dict_for  # noqa: F401 - bpe_files: fixture
from test_text_encoder import perturbed

PROMPTS = ["a photo of mystyle, red and blue", "MyStyle", "mystyles are not mystyle-like", "plain words only"]


def sd1_pair():
    """Our SD 1.x-style encoder and transformers' CLIPTextModel with the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    ours = perturbed(TextEncoder(TextConfig(width=32, layers=2, heads=2)), seed=1).eval()
    hf = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, hidden_act="quick_gelu")).eval()
    hf.load_state_dict(hf_keys(open_clip_to_hf_clip(ours.state_dict()), hf), strict=True)
    return ours, hf


def sd_pipeline(hf, bpe_files):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer
    unet = UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=2, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=8), text_encoder=hf, unet=unet,
        tokenizer=CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>", model_max_length=77),
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def test_a1111_pt_embedding_matches_diffusers_textual_inversion(tmp_path, bpe_files):
    ours, hf = sd1_pair()
    vectors = torch.randn(3, 32)
    path = tmp_path / "mystyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "mystyle", "step": 500,
                "sd_checkpoint": "abcdef", "sd_checkpoint_name": "base"}, path)
    with torch.no_grad():
        plain = ours.encode(PROMPTS)
    loaded, skipped = load_embeddings([tmp_path], ours)
    assert loaded == {"mystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32,
                                  "vectors": 3}} and skipped == {}
    pipe = sd_pipeline(hf, bpe_files)
    pipe.load_textual_inversion(str(path), token="mystyle")
    with torch.no_grad():
        got = ours.encode(PROMPTS)
        # diffusers reads the token case-sensitively and only as a whole word: spell it as our prompts mean it
        want = torch.cat([pipe.encode_prompt(p.replace("MyStyle", "mystyle").replace("mystyle-like", "mystyle -like"),
                                             "cpu", 1, False)[0] for p in PROMPTS])
    assert (got[0] - plain[0]).abs().max() > 1e-2  # the name did change the conditioning
    assert torch.equal(got[3], plain[3])  # and a prompt without it is untouched
    assert (got[[0, 1]] - want[[0, 1]]).abs().max().item() <= 1e-4
    assert not torch.equal(ours.tokenize(PROMPTS[2])[0, :3], ours.tokenize("mystyle")[0, :3])  # "mystyles": no match


def test_safetensors_emb_params_and_sdxl_clip_l_clip_g(tmp_path, bpe_files):
    """An SDXL embedding holds one matrix per text encoder; diffusers loads it into each with its own tokenizer."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer
    (tmp_path / "small.yaml").write_text(SMALL)
    models = build_models(load_model_config(tmp_path / "small.yaml"))
    perturbed(models.text, seed=2)
    text = models.text.eval()
    clip_l, clip_g = torch.randn(2, 64), torch.randn(2, 32)
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(folder / "xlstyle.safetensors"))
    save_file({"emb_params": torch.randn(2, 768)}, str(folder / "sd1only.safetensors"))
    with pytest.warns(UserWarning, match=r"1 embeddings skipped: .*sd1only.*made for another base"):
        from latentdiff.pipeline import Pipeline
        pipe_ours = Pipeline(models, device="cpu", dtype=torch.float32)
        pipe_ours.set_embeddings_dirs([folder])
    assert set(pipe_ours.embeddings) == {"xlstyle"} and set(pipe_ours.embeddings_skipped) == {"sd1only"}
    hf_l, hf_g = hf_text_encoders(state_dict_for(models))
    tok = CLIPTokenizer(*bpe_files, pad_token="<|endoftext|>", model_max_length=77)
    tok2 = CLIPTokenizer(*bpe_files, pad_token="!", model_max_length=77)
    unet = UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=8, cross_attention_dim=96,
                                attention_head_dim=2, layers_per_block=1, addition_embed_type="text_time",
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    ref = StableDiffusionXLPipeline(vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=8), text_encoder=hf_l,
                                    text_encoder_2=hf_g, tokenizer=tok, tokenizer_2=tok2, unet=unet,
                                    scheduler=EulerDiscreteScheduler(), add_watermarker=False)
    ref.load_textual_inversion(clip_l, token="xlstyle", text_encoder=hf_l, tokenizer=tok)
    ref.load_textual_inversion(clip_g, token="xlstyle", text_encoder=hf_g, tokenizer=tok2)
    prompt = "a xlstyle castle"
    with torch.no_grad():
        ctx, pooled = text.encode_with_pooled([prompt])
        want, _, want_pooled, _ = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert (ctx - want).abs().max().item() <= 1e-4
    assert (pooled - want_pooled).abs().max().item() <= 1e-4


def test_formats_are_read_and_bad_files_refused(tmp_path):
    v = torch.randn(4, 32)
    save_file({"emb_params": v}, str(tmp_path / "a.safetensors"))
    torch.save({"<tok>": v[0]}, tmp_path / "learned_embeds.bin")  # diffusers' own training output
    assert torch.equal(read_embedding(tmp_path / "a.safetensors")[""], v)
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.bin")[""], v[:1])

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}))
    with pytest.raises(AdapterError, match=r"evil.pt .*(refused|could not be read)"):
        read_embedding(tmp_path / "evil.pt")
    save_file({"emb_params": torch.full((2, 32), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(AdapterError, match="nan.safetensors.*not a finite"):
        read_embedding(tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:40])
    with pytest.raises(AdapterError, match="cut.safetensors"):
        read_embedding(tmp_path / "cut.safetensors")
