"""The pipeline: composition, CFG and prediction types against closed forms, reproducibility, img2img."""
import math

import pytest
import torch

from latentdiff.diffusion import ops
from latentdiff.pipeline import Pipeline, UNetDenoiser, pick_device, pick_dtype


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def test_device_and_dtype_defaults():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        pick_dtype(torch.device("cpu"), "fp8")


def test_generates_images_of_the_requested_size(pipe):
    res = pipe("a cat", steps=2, width=64, height=128, seed=1, progress=False)
    assert len(res.images) == 1 and res.images[0].size == (64, 128) and res.seeds == [1]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_denoised_estimate_matches_closed_form_with_cfg(pipe, prediction):
    """D from the fused CFG step equals x0 computed by hand in float64 from two separate U-Net calls."""
    torch.manual_seed(0)
    sched, B = pipe.schedule, 2
    ctx = pipe.encode_prompts(["a cat", "a dog"], ["", ""])
    t = 500
    sigma = float(sched.sigmas[t])
    x = torch.randn(B, 4, 16, 16) * math.sqrt(1 + sigma**2)
    den = UNetDenoiser(pipe.unet, sched, prediction, ctx, guidance=5.0)
    out = den(x, sigma)
    p, q = den.coefs(sigma)
    _, D = ops.sampler_step(x, out, p=p, q=q, a=0.0, b=1.0, guidance=den.guidance)

    ab = float(sched.alphas_cumprod[t])
    x_t = (x / math.sqrt(1 + sigma**2)).double()
    ts = torch.full((B,), float(sched.sigma_to_t(sigma)))
    with torch.no_grad():
        u = pipe.unet(x_t.float(), ts, ctx[:B]).double()
        c = pipe.unet(x_t.float(), ts, ctx[B:]).double()
    g = u + 5.0 * (c - u)
    if prediction == "epsilon":
        x0 = (x_t - math.sqrt(1 - ab) * g) / math.sqrt(ab)
    elif prediction == "v_prediction":
        x0 = math.sqrt(ab) * x_t - math.sqrt(1 - ab) * g
    else:
        x0 = g
    assert torch.allclose(D.double(), x0, atol=2e-4, rtol=1e-4), (D.double() - x0).abs().max()


def test_same_seed_same_image_and_batch_invariance(pipe):
    kw = dict(steps=3, sampler="euler_a", guidance=4.0, seed=10, progress=False, return_latents=True)
    a = pipe("a red ball", num_images=3, **kw)
    again = pipe("a red ball", num_images=3, **kw)
    assert torch.equal(a.latents, again.latents)  # deterministic on one device
    assert a.seeds == [10, 11, 12]
    for i in range(3):
        single = pipe("a red ball", num_images=1, **{**kw, "seed": 10 + i})
        # batch-invariant: image i of the batch is the single run with seed + i (CPU GEMMs may block a batch
        # differently, so allow float rounding, far below one 8-bit level)
        assert torch.allclose(a.latents[i], single.latents[0], atol=1e-4), (a.latents[i] - single.latents[0]).abs().max()


def test_fused_and_torch_backends_agree(pipe):
    if not ops.fused_available():
        pytest.skip("fused kernels not built")
    kw = dict(steps=4, sampler="DPM++ 2M Karras", guidance=6.0, seed=3, progress=False, return_latents=True)
    f = pipe("a boat", backend="fused", **kw).latents
    t = pipe("a boat", backend="torch", **kw).latents
    assert torch.allclose(f, t, atol=1e-4, rtol=1e-4)


def test_negative_prompt_and_guidance_one(pipe):
    kw = dict(steps=2, seed=5, progress=False, return_latents=True)
    plain = pipe("a tree", guidance=1.0, **kw).latents
    neg = pipe("a tree", negative_prompt="fog", guidance=1.0, **kw).latents
    assert torch.equal(plain, neg)  # guidance 1 ignores the negative prompt (single batched pass)
    guided = pipe("a tree", negative_prompt="fog", guidance=7.0, **kw).latents
    assert not torch.allclose(guided, plain)


def test_negatives_encoded_once_per_distinct_prompt(pipe, monkeypatch):
    calls = []
    real = pipe.text.encode
    monkeypatch.setattr(pipe.text, "encode", lambda prompts, **kw: calls.append(list(prompts)) or real(prompts, **kw))
    ctx = pipe.encode_prompts(["a", "b", "c"], ["", "", ""])
    assert calls == [["a", "b", "c", ""]]
    empty = real([""])
    for i in range(3):
        assert torch.equal(ctx[i], empty[0])


def test_long_prompts_are_chunked_not_cut(pipe):
    long = " ".join(["cat"] * 100)  # > 75 tokens
    ctx = pipe.encode_prompts([long], [""])
    assert ctx.shape[1] == 2 * 77
    res = pipe(long, steps=1, seed=0, progress=False)
    assert res.images[0].size == (64, 64)


def test_bad_settings_are_rejected_with_the_fix(pipe):
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("x", width=60, steps=1)
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        pipe("x", steps=0)
    with pytest.raises(ValueError, match="finite"):
        pipe("x", steps=1, guidance=float("nan"))
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe("x", steps=1, sampler="nope")


def test_trajectory_has_one_frame_per_step(pipe):
    res = pipe("a cat", steps=3, seed=2, progress=False, trajectory=True, num_images=2)
    assert len(res.trajectory) == 2 and all(len(t) == 3 for t in res.trajectory)


def test_trajectory_frames_are_the_samplers_denoised_values(pipe):
    """Frame k of image i is the sampler's predicted x0 of step k for row i (its callback's "denoised"), decoded:
    compared with the VAE's decode of those latents, mapped to 8 bits here, within one level."""
    import numpy as np
    seen = []
    res = pipe("a cat", steps=3, seed=2, progress=False, trajectory=True, num_images=2, sampler="euler",
               callback=lambda info: seen.append(info["denoised"].clone()))
    assert len(seen) == 3
    for k, denoised in enumerate(seen):
        with torch.no_grad():
            decoded = pipe.vae.decode(denoised.to(pipe.vae_dtype)).double()
        want = ((decoded.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
        for i in range(2):
            frame = np.asarray(res.trajectory[i][k], dtype=np.float64)
            assert np.abs(frame - want[i]).max() <= 1.0, (i, k)
    assert not np.array_equal(np.asarray(res.trajectory[0][0]), np.asarray(res.trajectory[0][2]))
    # Euler's last step lands on its denoised value: the last frame is the image.
    assert all(np.array_equal(np.asarray(t[-1]), np.asarray(im)) for t, im in zip(res.trajectory, res.images))


def test_img2img_starts_from_the_q_sampled_image(pipe):
    """At strength s the run starts at the snapped timestep t0 from x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    from PIL import Image
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    seen = []
    res = pipe("a cat", init_image=img, strength=0.5, steps=10, sampler="euler", seed=4, progress=False,
               callback=lambda info: seen.append(info["sigma"]))
    assert len(seen) == 5  # half the steps
    from latentdiff.diffusion.samplers import NoiseSampler, get_sampler
    from latentdiff.io.images import from_pil
    sigmas = get_sampler("euler").sigmas(pipe.schedule, 10)
    x, left = pipe._init_from_image(img, (64, 64), sigmas, 0.5, NoiseSampler([torch.Generator().manual_seed(4)]),
                                    (1, 4, 16, 16))
    t0 = int(round(float(pipe.schedule.sigma_to_t(float(sigmas[5])))))
    assert float(left[0]) == pytest.approx(float(pipe.schedule.sigmas[t0]))
    x0 = pipe.vae.encode(from_pil(img, (64, 64), "cpu", torch.float32)).double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float32).double()
    ab = float(pipe.schedule.alphas_cumprod[t0])
    expect = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    assert torch.allclose(x.double(), expect, atol=1e-4)
    assert res.images[0].size == (64, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "DPM++ 2M Karras",
                                     "dpmpp_2m_sde"])
@pytest.mark.parametrize("graphed", [False, True])
def test_sampling_loop_has_no_host_device_syncs(tiny_checkpoint, sampler, graphed):
    """torch.cuda.set_sync_debug_mode("error") raises on any sync: the whole loop must run without one, with the
    eager U-Net and with the CUDA-graph replay the pipeline uses (captured in the warm-up run)."""
    from latentdiff.diffusion.samplers import NoiseSampler, get_sampler
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cuda", dtype="fp16")
    spec = get_sampler(sampler)
    sigmas = spec.sigmas(pipe.schedule, 8)
    den = UNetDenoiser(pipe.unet_call if graphed else pipe.unet, pipe.schedule, "epsilon", pipe.encode_prompts(["a cat"], [""]), 7.5, dtype=pipe.dtype)
    noise = NoiseSampler([torch.Generator("cuda").manual_seed(0)])
    x = noise(torch.empty(1, 4, 16, 16, device="cuda")) * math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():  # as the pipeline runs it (the graphs replay only without autograd)
        spec.fn(den, x, sigmas, noise=noise, disable=True)  # warm-up: lazy init may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = spec.fn(den, x, sigmas, noise=noise, disable=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()
    assert not graphed or len(pipe.unet_call.graphs) == 1


def test_given_latents_are_the_starting_noise(pipe):
    """latents= is unit-variance noise (diffusers' convention): passing the seed's own draw reproduces the seed."""
    from latentdiff.diffusion.samplers import NoiseSampler
    kw = dict(steps=3, sampler="euler", guidance=3.0, progress=False, return_latents=True)
    ref = pipe("a cat", seed=9, **kw).latents
    draw = NoiseSampler([torch.Generator().manual_seed(9)])(torch.empty(1, 4, 16, 16))
    assert torch.equal(pipe("a cat", latents=draw, seed=0, **kw).latents, ref)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("a cat", latents=torch.zeros(1, 4, 8, 8), **kw)


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of the tensor storages ops create while it is on, each counted until it is freed: a
    measurement of activation memory on the CPU, where torch keeps no allocator statistics."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:  # views share their base's storage
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def test_the_memory_estimate_counts_a_long_prompt_s_context(pipe):
    """A 20-chunk prompt is a 1540-token context that cross-attention holds with its keys and values beside the
    image's activations: what it adds to a U-Net call's measured peak, the estimate adds at least as much (at 16x16,
    where the U-Net rather than the VAE sets the estimate)."""
    peaks = {}
    for chunks in (1, 20):
        den = pipe.denoiser(["\u0d9e" * (75 * chunks // 2)], [""], 5.0, size=(16, 16))
        assert den.context.shape[1] == 77 * chunks
        with torch.no_grad(), LiveBytes() as memory:
            den(torch.randn(1, 4, 4, 4), 3.0)
        peaks[chunks] = memory.peak + den.context.nbytes  # the context itself was made before the call
    grown = peaks[20] - peaks[1]
    estimated = pipe.image_bytes(16, 16, 5.0, tokens=1540) - pipe.image_bytes(16, 16, 5.0, tokens=77)
    assert grown > 2**20 and grown <= estimated <= 2 * grown, (grown, estimated)
    assert pipe.image_bytes(16, 16, 5.0) == pipe.image_bytes(16, 16, 5.0, tokens=77)  # one chunk by default
    assert pipe.context_tokens(["x", "\u0d9e" * 100]) == 3 * 77  # 200 tokens: three chunks


def test_the_context_estimate_counts_the_chunks_the_encoder_makes(pipe, monkeypatch):
    """The memory estimate's context is the encoder's: a BREAK starts a chunk, a chunk that fills up just after a
    comma moves its last words on, an embedding is not split, a schedule encodes each of its texts; and the hires
    pass's own prompts count for the hires pass."""
    from latentdiff.pipeline import Hires
    cases = {"a BREAK b": 2, "x BREAK " * 30: 30, "word " * 60 + ", " + "word " * 89: 3, "\u0d9e" * 100: 3,
             "emb40 emb40 emb40": 3}  # 3, 60, 150, 200 and 120 BPE tokens
    pipe.text.set_embeddings({"emb40": torch.randn(40, pipe.config.text.width)})
    try:
        for text, chunks in cases.items():
            assert pipe.context_tokens([text]) == chunks * 77, text[:20]
            assert pipe.encode_schedules([text], None, None, 1)[0].shape[1] == chunks * 77  # what is encoded
    finally:
        pipe.text.set_embeddings({})
    assert pipe.context_tokens(["[a|b BREAK c]"], steps=1) == 77  # alternation: "a" alone in one step
    assert pipe.context_tokens(["[a|b BREAK c]"], steps=2) == 2 * 77
    calls = []
    monkeypatch.setattr(pipe, "max_batch", lambda h, w, g, tokens=None: calls.append((h, w, tokens)) or 1 << 30)
    pipe("x", steps=1, height=16, width=16, guidance=5.0, progress=False,
         hires=Hires(scale=2.0, steps=1, prompt="x BREAK " * 5))
    assert {c for c in calls if c[0] == 16} == {(16, 16, 77)} and {c for c in calls if c[0] == 32} == {(32, 32, 385)}
