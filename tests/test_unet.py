"""U-Net: parity with diffusers' UNet2DConditionModel on weights converted by diffusers' own LDM converter."""
import pytest
import torch

from latentdiff.models.unet import UNetConfig, UNetModel, timestep_embedding

# Small configs with the SD1 / SD2 structure: conv vs Linear proj_in, head count vs channels per head,
# attention on some levels only (SD has none on the last level). norm_groups stays 32 as diffusers assumes.
SD1_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                       num_heads=8, context_dim=24, use_linear_in_transformer=False, norm_groups=32)
SD2_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                       num_heads=-1, num_head_channels=16, context_dim=40, use_linear_in_transformer=True,
                       norm_groups=32, transformer_depth=2)


def random_unet(cfg, seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(cfg).eval()
    with torch.no_grad():  # SD zero-initializes output layers, which would hide most of the network
        for p in unet.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.02)  # norms and biases away from 1 and 0 too
    return unet


def diffusers_unet(cfg, state):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    params = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
                  channel_mult=list(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                  attention_resolutions=list(cfg.attention_resolutions), transformer_depth=cfg.transformer_depth,
                  context_dim=cfg.context_dim, use_linear_in_transformer=cfg.use_linear_in_transformer)
    if cfg.num_head_channels == -1:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.num_head_channels
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    ckpt = {"model.diffusion_model." + k: v for k, v in state.items()}
    config = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=256)
    ref = UNet2DConditionModel(**config).eval()
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    ref.load_state_dict(converted, strict=True)  # every converted key used, none missing
    return ref


@pytest.mark.filterwarnings("ignore:`image_size` is deprecated:FutureWarning")
@pytest.mark.parametrize("cfg", [SD1_SMALL, SD2_SMALL], ids=["sd1", "sd2"])
def test_unet_matches_diffusers(cfg):
    unet = random_unet(cfg)
    ref = diffusers_unet(cfg, unet.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    for t in (torch.tensor([999, 3]), torch.tensor([541.25, 0.5])):  # int and fractional (k-diffusion) steps
        with torch.no_grad():
            ours = unet(x, t, context)
            theirs = ref(x, t, encoder_hidden_states=context).sample
        assert ours.shape == x.shape
        assert ours.abs().mean() > 0.1  # real signal, not an all-zero output
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 7.5, 999.0], dtype=torch.float64)
    dim = 8
    emb = timestep_embedding(t, dim).double()
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    assert torch.allclose(emb, expected, atol=1e-4)


def test_scalar_and_int_timesteps_agree():
    unet = random_unet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(2,), num_heads=2, context_dim=16, norm_groups=8))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    with torch.no_grad():
        a = unet(x, torch.tensor([10, 10]), ctx)
        b = unet(x, 10.0, ctx)
        c = unet(x, torch.tensor([10.0, 10.0], dtype=torch.float64), ctx)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_gradient_checkpointing_same_output_and_grads():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                     num_heads=4, context_dim=16, norm_groups=8)
    unet = random_unet(cfg).train()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16), torch.tensor([5, 500])
    unet(x, t, ctx).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.zero_grad()
    unet.gradient_checkpointing = True
    unet(x, t, ctx).square().mean().backward()
    for n, p in unet.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6, rtol=1e-5), n


def test_norm_groups_from_config():
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                num_heads=2, context_dim=16, norm_groups=4))
    groups = {m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {4}
