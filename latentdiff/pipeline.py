"""Text-to-image: text encoder -> latent U-Net denoising from pure noise -> VAE decoder."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image

from latentdiff.diffusion import ops
from latentdiff.io.checkpoint import Models, build_models, load_models
from latentdiff.io.config import ModelConfig, load_model_config
from latentdiff.io.images import from_pil, to_pil
from latentdiff.diffusion.process import guidance_rescale
from latentdiff.diffusion.samplers import NoiseSampler, get_sampler
from latentdiff.diffusion.schedule import Schedule
from latentdiff.models.text_encoder import DualTextEncoder
from latentdiff.models.unet import micro_conditioning


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA by default (bf16 selectable), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: choose fp32, fp16 or bf16")
    return names[dtype]


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Run the model's op kinds once on tiny tensors, so an unsupported dtype fails in one line before any loading."""
    if dtype == torch.float32:
        return
    try:
        x = torch.ones(1, 8, 4, 4, device=device, dtype=dtype)
        w = torch.ones(8, 8, 3, 3, device=device, dtype=dtype)
        h = torch.nn.functional.group_norm(torch.nn.functional.conv2d(x, w, padding=1), 4)
        q = h.flatten(2).transpose(1, 2)[:, None]  # (1, 1, 16, 8)
        torch.nn.functional.layer_norm(torch.nn.functional.scaled_dot_product_attention(q, q, q), (8,))
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"{DTYPE_NAMES[dtype]} is not supported on {device} ({str(e).splitlines()[0][:120]}); "
                         f"use --dtype fp32") from None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on the device: free + cached on CUDA, MemAvailable on Linux; else None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class UNetDenoiser:
    """The U-Net seen as a k-diffusion denoiser: `model(x, sigma)` returns the raw network output and
    `coefs(sigma)` turns it into the denoised estimate D = p*x + q*out (see docs/internals.md).

    With classifier-free guidance the batch is run once as [uncond; cond] and the kernel fuses the
    combination; guidance rescale (Lin et al. 2023) needs a reduction, so it is applied here instead.
    """

    def __init__(self, unet, schedule: Schedule, prediction: str, context: torch.Tensor,
                 guidance: float | None = None, rescale: float = 0.0, dtype: torch.dtype = torch.float32,
                 y: torch.Tensor | None = None):
        self.unet, self.schedule, self.prediction, self.dtype = unet, schedule, prediction, dtype
        self.context = context.to(dtype)  # (2B, L, D) with guidance, else (B, L, D); uncond rows first
        self.y = None if y is None else y.to(dtype)  # SDXL's vector, rows as in context
        self.rescale = rescale if guidance is not None else 0.0
        self.scale = guidance
        # With a rescale the guided output is formed in torch, and the kernel sees a plain batch.
        self.guidance = guidance if not self.rescale else None

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        c_in = 1.0 / math.sqrt(1.0 + sigma * sigma)  # x_t = x / sqrt(1 + sigma^2), the VP input
        t = float(self.schedule.sigma_to_t(sigma))
        x_in = (x * c_in).to(self.dtype)
        if self.scale is not None:
            x_in = torch.cat([x_in, x_in])
        ts = torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.float32)
        args = (x_in, ts, self.context) if self.y is None else (x_in, ts, self.context, self.y)
        out = self.unet(*args).float()  # (B or 2B, C, h, w)
        if self.rescale:
            u, c = out.chunk(2)
            out = guidance_rescale(u + self.scale * (c - u), c, self.rescale)
        return out

    def coefs(self, sigma: float) -> tuple[float, float]:
        if self.prediction == "epsilon":  # D = x - sigma * eps
            return 1.0, -sigma
        if self.prediction == "v_prediction":  # D = x / (1 + s^2) - s / sqrt(1 + s^2) * v
            return 1.0 / (1.0 + sigma * sigma), -sigma / math.sqrt(1.0 + sigma * sigma)
        return 0.0, 1.0  # sample: the network predicts x0 itself


class GraphedUNet:
    """The U-Net replayed from a CUDA graph per input shape (Pipeline's default on CUDA).

    An SD U-Net call is about a thousand small kernels; at batch 2 and 512x512 a large GPU runs them faster than
    the host can launch them one by one. A graph launches them all at once: inputs are copied into the graph's
    own tensors, the recorded kernels replay, and the output is copied out (a replay overwrites it). If a capture
    fails the U-Net runs eagerly from then on, with one warning.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.graphs, self.failed = unet, {}, False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.failed or torch.is_grad_enabled():
            return self.unet(*args)
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(args)
            except RuntimeError as e:
                self.failed = True
                warnings.warn(f"latentdiff: CUDA graph capture failed ({str(e).splitlines()[0]}); "
                              "running the U-Net eagerly")
                return self.unet(*args)
        inputs, output, graph = self.graphs[key]
        for dst, src in zip(inputs, args):
            dst.copy_(src)
        graph.replay()
        return output.clone()

    def _capture(self, args):
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: library handles and algorithm choices are made here
            for _ in range(2):
                self.unet(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.unet(*inputs)
        return inputs, output, graph


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    latents: torch.Tensor | None = None  # (B, C, h, w) final latents, when asked
    trajectory: list[list[Image.Image]] = field(default_factory=list)  # per image, predicted x0 at each step


class Pipeline:
    """The three modules, the schedule and a sampler, composed."""

    def __init__(self, models: Models, device: str | torch.device = "auto", dtype=None, compile: bool = False,
                 cuda_graphs: bool = True):
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        check_dtype(self.device, self.dtype)
        self.config: ModelConfig = models.config
        self.unet = models.unet.to(self.device, self.dtype).eval()
        # The SDXL VAE overflows in fp16 (diffusers' force_upcast): it alone runs in float32 then.
        self.vae_dtype = (torch.float32 if self.config.vae.force_upcast and self.dtype == torch.float16
                          else self.dtype)
        self.vae = models.vae.to(self.device, self.vae_dtype).eval()
        self.text = models.text.to(self.device, self.dtype).eval()
        if self.device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
        # What the sampler calls: CUDA graphs on CUDA (torch.compile makes its own choices there)
        graphed = cuda_graphs and self.device.type == "cuda" and not compile
        self.unet_call = GraphedUNet(self.unet) if graphed else self.unet
        self.schedule = Schedule.from_config(self.config.diffusion)
        self.checkpoint_path: str | None = None

    @classmethod
    def from_checkpoint(cls, path, device="auto", dtype=None, prediction: str | None = None, ema: bool = False,
                        compile: bool = False, config: ModelConfig | None = None, cuda_graphs: bool = True) -> "Pipeline":
        """SD 1.x / 2.x single-file checkpoints and latentdiff checkpoints (config: override the detected one)."""
        dev = pick_device(device)
        check_dtype(dev, pick_dtype(dev, dtype))
        models = load_models(path, device=dev, dtype=pick_dtype(dev, dtype), prediction=prediction, ema=ema,
                             config=config)
        pipe = cls(models, dev, dtype, compile=compile, cuda_graphs=cuda_graphs)
        pipe.checkpoint_path = str(path)
        return pipe

    @classmethod
    def from_config(cls, config: ModelConfig | str, device="auto", dtype=None, seed: int = 0) -> "Pipeline":
        """A randomly initialised model from a config (for tests and benchmarks: speed needs no weights)."""
        if not isinstance(config, ModelConfig):
            config = load_model_config(config)
        torch.manual_seed(seed)
        return cls(build_models(config), device, dtype)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE factor times the U-Net's downsampling."""
        return self.vae.latent_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negatives: list[str], clip_skip: int | None = None):
        """Context for [uncond; cond]: (2B, L, D). Each distinct negative prompt is encoded once."""
        return self.encode_prompts_pooled(prompts, negatives, clip_skip)[0]

    @torch.no_grad()
    def encode_prompts_pooled(self, prompts: list[str], negatives: list[str] | None, clip_skip: int | None = None):
        """(context, pooled) for [uncond; cond], or for the prompts alone when negatives is None.

        pooled is SDXL's bigG text embedding (None for SD 1.x / 2.x). An empty SDXL negative prompt is all
        zeros, context and pooled, as SDXL base is sampled (SGM's force_uc_zero_embeddings, diffusers'
        force_zeros_for_empty_prompt).
        """
        unique = [] if negatives is None else list(dict.fromkeys(negatives))
        texts = list(prompts) + unique
        if isinstance(self.text, DualTextEncoder):
            ctx, pooled = self.text.encode_with_pooled(texts, clip_skip=clip_skip)  # one call: one chunk count k
            empty = torch.tensor([i >= len(prompts) and t == "" for i, t in enumerate(texts)], device=ctx.device)
            ctx, pooled = ctx.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)
        else:
            ctx, pooled = self.text.encode(texts, clip_skip=clip_skip), None
        if negatives is None:
            return ctx, pooled
        index = torch.tensor([len(prompts) + unique.index(n) for n in negatives] + list(range(len(prompts))),
                             device=ctx.device)
        return ctx[index], None if pooled is None else pooled[index]

    @torch.no_grad()
    def denoiser(self, prompts: list[str], negatives: list[str], guidance: float, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, size: tuple[int, int] | None = None) -> UNetDenoiser:
        """The U-Net conditioned on the prompts, with classifier-free guidance unless guidance is 1.

        size: (height, width) of the image in pixels, SDXL's micro-conditioning (default: the model's size).
        """
        # guidance 1 is the conditional model alone: one batch, the negative prompt plays no part
        context, pooled = self.encode_prompts_pooled(prompts, negatives if guidance != 1.0 else None, clip_skip)
        y = None
        if pooled is not None:
            # SDXL: original size = target size = the requested size, crop (0, 0) (Podell et al. 2023, 2.2)
            h, w = size or (self.config.image_size, self.config.image_size)
            sizes = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=pooled.device)
            y = micro_conditioning(pooled, sizes.expand(pooled.shape[0], -1))
        return UNetDenoiser(self.unet_call, self.schedule, self.config.diffusion.prediction, context,
                            guidance if guidance != 1.0 else None, guidance_rescale, self.dtype, y)

    def image_bytes(self, height: int, width: int, guidance: float) -> int:
        """Peak activation memory one image needs, an upper estimate: the U-Net's (twice with CFG), then the VAE's.

        U-Net: every skip connection lives until its output block, beside a dozen channel-widths of the widest
        level being computed (GEGLU's 8x inner width and its product). VAE decoder: six tensors of the widest
        channel count at each resolution (SD 2.1 at 512x512 in fp16 measured 0.60 GiB on an H200, this gives 0.75).
        Attention is counted as linear in the tokens: SDPA's flash and memory-efficient kernels never form the full
        score matrix.
        """
        size = torch.finfo(self.dtype).bits // 8
        u, v = self.config.unet, self.config.vae
        f = self.vae.latent_factor
        h, w = -(-height // f), -(-width // f)
        skips, widest = u.model_channels * h * w, 0
        for level, mult in enumerate(u.channel_mult):
            n, c = (-(-h // 2**level)) * (-(-w // 2**level)), mult * u.model_channels
            skips += u.num_res_blocks * c * n + (c * n // 4 if level < len(u.channel_mult) - 1 else 0)
            widest = max(widest, c * n)
        unet = (1 if guidance == 1.0 else 2) * (skips + 12 * widest) * size
        vae = 0
        for level, mult in enumerate(v.ch_mult):
            n = (-(-height // 2**level)) * (-(-width // 2**level))
            c = v.ch * max(v.ch_mult[level:level + 2])  # the level's own width and what the level above brings up
            vae = max(vae, 6 * c * n * (torch.finfo(self.vae_dtype).bits // 8))
        latents = 4 * u.in_channels * h * w * 4  # x, the denoised estimate, noise and the step's output, float32
        return max(unet, vae) + latents

    def max_batch(self, height: int, width: int, guidance: float) -> int:
        """How many images one pass may hold at once; refuses a size no batch fits, naming both numbers."""
        need, have = self.image_bytes(height, width, guidance), available_memory(self.device)
        if have is None:
            return 1 << 30
        if need > have:
            raise ValueError(f"a {width}x{height} image needs about {gib(need)} of activations but {self.device} has "
                             f"{gib(have)} available; choose a smaller --width/--height")
        return max(1, int(0.7 * have) // need)

    def check(self, *, steps: int, height: int, width: int, guidance: float, strength: float | None = None,
              seed: int = 0, count: int = 1):
        """Reject bad settings up front with a message that says how to fix them."""
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"width and height must be positive multiples of {m} for this model "
                             f"(got {width}x{height}); try {max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}")
        if not 1 <= steps <= self.schedule.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.schedule.num_timesteps} for this model (got {steps})")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number (got {guidance})")
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1] (got {strength})")
        if not 0 <= seed or seed + count - 1 > MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED - count + 1} for {count} image(s), one seed each "
                             f"(got {seed})")
        self.max_batch(height, width, guidance)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int | None = None,
                 sampler: str | None = None, guidance: float | None = None, guidance_rescale: float = 0.0,
                 height: int | None = None, width: int | None = None, num_images: int = 1, seed: int = 0,
                 generators: list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 init_image: Image.Image | None = None, strength: float = 0.75, clip_skip: int | None = None,
                 callback=None, trajectory: bool = False, return_latents: bool = False,
                 progress: bool = True, backend: str | None = None) -> Result:
        """Generate num_images per prompt; image i of the batch uses seed + i (batch-invariant)."""
        d = self.config.sampling
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        spec = get_sampler(d.sampler if sampler is None else sampler)
        height = height or self.config.image_size
        width = width or self.config.image_size
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * (len(prompts) // num_images)
        negs = [n for n in negs for _ in range(num_images)]
        if len(negs) != len(prompts):
            raise ValueError(f"got {len(negs) // num_images} negative prompts for {len(prompts) // num_images} prompts")
        B = len(prompts)
        self.check(steps=steps, height=height, width=width, guidance=guidance,
                   strength=strength if init_image is not None else None, seed=seed, count=B)
        seeds = [seed + i for i in range(B)]
        if generators is None:
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        shape = (B, self.config.unet.in_channels, height // self.vae.latent_factor, width // self.vae.latent_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")

        # Images are independent (one generator each), so a batch too large for the device runs in chunks
        # and gives the same images.
        chunk = self.max_batch(height, width, guidance)
        settings = dict(spec=spec, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale,
                        size=(width, height), init_image=init_image, strength=strength, clip_skip=clip_skip,
                        callback=callback, trajectory=trajectory, progress=progress, backend=backend)
        images, finals, traj = [], [], []
        for i in range(0, B, chunk):
            j = min(B, i + chunk)
            out = self._sample(prompts[i:j], negs[i:j], generators[i:j], None if latents is None else latents[i:j],
                               (j - i,) + shape[1:], **settings)
            images += out[0]
            finals.append(out[1])
            traj += out[2]
        return Result(images, seeds, prompts, torch.cat(finals) if return_latents else None, traj)

    def _sample(self, prompts, negs, generators, latents, shape, *, spec, steps, guidance, guidance_rescale, size,
                init_image, strength, clip_skip, callback, trajectory, progress, backend):
        """One batch that fits the device: (PIL images, final latents, per-image trajectories)."""
        noise = NoiseSampler(generators)
        denoiser = self.denoiser(prompts, negs, guidance, guidance_rescale, clip_skip, size=(size[1], size[0]))
        sigmas = spec.sigmas(self.schedule, steps)
        B = shape[0]
        with ops.use_backend(backend):
            if init_image is not None:
                x, sigmas = self._init_from_image(init_image, size, sigmas, strength, noise, shape)
            else:
                # `latents` are the starting noise (unit variance), as in diffusers; scaled to the first sigma here.
                start = noise(torch.empty(shape, device=self.device)) if latents is None else latents.to(self.device, torch.float32)
                x = start * math.sqrt(1.0 + float(sigmas[0]) ** 2)

            track: list[torch.Tensor] = []

            def on_step(info):
                if trajectory:
                    track.append(info["denoised"])
                if callback is not None:
                    callback(info)

            x = spec.fn(denoiser, x, sigmas, noise=noise, callback=on_step, disable=not progress)
            images = to_pil(self.decode(x))
        traj = []
        if trajectory:
            frames = [to_pil(self.decode(dn)) for dn in track]  # per step, a list over the batch
            traj = [[f[i] for f in frames] for i in range(B)]
        return images, x, traj

    def _init_from_image(self, image, size, sigmas, strength, noise, shape):
        """img2img: encode, q-sample to the start step with the fused forward op; returns (x, sigmas left).

        The run skips the first (1 - strength) of the steps. The start sigma is snapped up to an integer
        timestep t0 (the forward op takes integer t), and sampling continues from exactly sigma_t0.
        """
        steps = len(sigmas) - 1
        start = steps - max(1, min(steps, int(round(steps * strength))))
        t0 = self.img2img_start(float(sigmas[start]))
        sigmas = torch.cat([self.schedule.sigmas[t0:t0 + 1], sigmas[start + 1:]])
        x0 = self.vae.encode(from_pil(image, size, self.device, self.vae_dtype)).float()
        x0 = x0.expand(shape[0], -1, -1, -1).contiguous()
        sqrt_ab, sqrt_1m_ab = self.schedule.tables(self.device)
        t = torch.full((shape[0],), t0, device=self.device, dtype=torch.int64)
        x_t = ops.q_sample(x0, noise(x0), t, sqrt_ab, sqrt_1m_ab)
        return x_t * math.sqrt(1.0 + float(sigmas[0]) ** 2), sigmas  # into sigma space: x = x_t / sqrt(abar)

    def img2img_start(self, sigma: float) -> int:
        """The smallest integer timestep whose sigma is at least `sigma`."""
        # Rounding to the nearest could go below sigma, down to the next sigma of a dense schedule (many Karras
        # steps, small strength); the sigmas must stay strictly descending.
        t = float(self.schedule.sigma_to_t(sigma))
        return min(math.ceil(t - 1e-9), self.schedule.num_timesteps - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae_dtype)).float()
