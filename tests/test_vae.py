"""VAE: parity with diffusers' AutoencoderKL on weights converted by diffusers' own LDM converter."""
import math

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

SMALL = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=32, resolution=32)
TINY = VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=32)


def random_vae(cfg, seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).eval()
    with torch.no_grad():  # move norms and biases away from 1 and 0 so every weight matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


def diffusers_vae(cfg, state):
    from diffusers import AutoencoderKL as Reference
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    ddconfig = dict(in_channels=cfg.in_channels, out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult),
                    num_res_blocks=cfg.num_res_blocks, attn_resolutions=list(cfg.attn_resolutions),
                    z_channels=cfg.z_channels, resolution=cfg.resolution, double_z=True, dropout=0.0)
    original = {"model": {"params": {"scale_factor": cfg.scale_factor,
                                     "first_stage_config": {"params": {"embed_dim": cfg.embed_dim,
                                                                       "ddconfig": ddconfig}}}}}
    ckpt = {"first_stage_model." + k: v for k, v in state.items()}
    config = create_vae_diffusers_config_from_ldm(original, ckpt, image_size=cfg.resolution)
    ref = Reference(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)
    return ref


@pytest.mark.filterwarnings("ignore:`image_size` is deprecated:FutureWarning")
def test_vae_matches_diffusers():
    vae = random_vae(SMALL)
    ref = diffusers_vae(SMALL, vae.state_dict())
    images = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post, ref_post = vae.encode_posterior(images), ref.encode(images).latent_dist
        z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(2))
        dec, ref_dec = vae.decode(z * SMALL.scale_factor), ref.decode(z).sample
    assert post.mean.shape == (2, 4, 6, 8)
    assert dec.shape == (2, 3, 24, 32) and dec.abs().mean() > 0.05
    for ours, theirs in ((post.mean, ref_post.mean), (post.logvar, ref_post.logvar), (dec, ref_dec)):
        assert (ours - theirs).abs().max().item() <= 1e-4
    assert (post.kl() - ref_post.kl()).abs().max().item() <= 1e-3 * ref_post.kl().abs().max().item()


def test_encode_scales_mode_or_sample():
    vae = random_vae(TINY)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = vae.encode_posterior(images)
        mode = vae.encode(images)
        sample = vae.encode(images, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(mode, post.mean * TINY.scale_factor)
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sample, (post.mean + post.std * noise) * TINY.scale_factor, atol=1e-6)
    assert vae.latent_factor == 2 and mode.shape == (1, 4, 8, 8)


def test_diagonal_gaussian_kl_closed_form():
    mean, logvar = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    kl = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2 per element, summed.
    s = torch.exp(0.5 * logvar)
    expected = (torch.log(1 / s) + (s ** 2 + mean ** 2) / 2 - 0.5).sum(dim=[1, 2, 3])
    assert torch.allclose(kl, expected)


def test_downsample_pads_right_and_bottom_only():
    from latentdiff.models.vae import Downsample
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
        down.conv.bias.zero_()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(down(x), x[:, :, ::2, ::2])


def test_tiled_decode_blends_to_the_untiled_result_for_a_local_decoder(monkeypatch):
    vae = AutoencoderKL(TINY)
    # With a decoder that is local (each pixel depends only on its latent) every tile agrees on the overlap,
    # so any correct weighted blend must reproduce the untiled decode exactly.
    monkeypatch.setattr(vae, "_decode", lambda z: F.interpolate(z[:, :3] * 2 + 1, scale_factor=2, mode="nearest"))
    z = torch.randn(2, 4, 21, 13)
    full = vae.decode(z)
    for tile, overlap in ((8, 2), (6, 5), (13, 0)):
        tiled = vae.decode(z, tile=tile, overlap=overlap)
        assert torch.allclose(tiled, full, atol=1e-6), (tile, overlap)


def test_tiled_decode_real_decoder_is_close_and_exact_for_one_tile():
    vae = random_vae(TINY)
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae.decode(z)
        assert torch.equal(vae.decode(z, tile=12), full)
        tiled = vae.decode(z, tile=8, overlap=4)
    assert tiled.shape == full.shape
    # Tiles see less context (and other GroupNorm statistics): close on average, not equal. Measured 0.175; tiles
    # averaged with equal weights over the overlap score 0.260, each tile written over the last 0.358.
    rel = ((tiled - full).abs().mean() / full.abs().mean()).item()
    assert rel < 0.21, rel


def test_tiled_decode_fades_tiles_that_disagree_across_the_overlap(monkeypatch):
    """A decoder that is local but for one offset per tile (the tile's own mean taken out, as its GroupNorm
    statistics shift a real tile): tiles disagree by a constant each, and the blend must spread each disagreement
    over the overlap, so neighbouring pixels of tiled - untiled differ by at most 1/4 of the largest disagreement.
    Measured: 0.057 with the linear ramps; 0.381 with equal weights over the overlap, 0.459 writing each tile over
    the last (a hard seam)."""
    vae = AutoencoderKL(TINY)
    monkeypatch.setattr(vae, "_decode", lambda z: F.interpolate(z[:, :3] - z[:, :3].mean(dim=(2, 3), keepdim=True),
                                                                scale_factor=2, mode="nearest"))
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(5)) + torch.linspace(-2, 2, 20)
    full, tiled = vae.decode(z), vae.decode(z, tile=8, overlap=4)
    err = (tiled - full).double()
    offsets = [z[:, :3, y:y + 8, x:x + 8].mean(dim=(2, 3)) for y in (0, 4, 8, 12) for x in (0, 4, 8, 12)]
    spread = max((a - b).abs().max().item() for a in offsets for b in offsets) / vae.config.scale_factor
    jump = max((err[..., 1:] - err[..., :-1]).abs().max().item(),
               (err[..., 1:, :] - err[..., :-1, :]).abs().max().item())
    assert spread > 1.0  # the tiles do disagree
    assert jump <= spread / 4, (jump, spread)


def test_bad_tile_overlap_is_a_clear_error():
    vae = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="overlap < tile"):
        vae.decode(torch.zeros(1, 4, 20, 20), tile=8, overlap=8)
