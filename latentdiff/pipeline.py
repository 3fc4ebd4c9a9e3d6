"""Text-to-image: text encoder -> latent U-Net denoising from pure noise -> VAE decoder."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import ops
from .checkpoint import Models, build_models, load_models
from .config import ModelConfig, load_model_config
from .diffusion import guidance_rescale
from .samplers import NoiseSampler, get_sampler
from .schedule import Schedule


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


class UNetDenoiser:
    """The U-Net seen as a k-diffusion denoiser: `model(x, sigma)` returns the raw network output and
    `coefs(sigma)` turns it into the denoised estimate D = p*x + q*out (see docs/internals.md).

    With classifier-free guidance the batch is run once as [uncond; cond] and the kernel fuses the
    combination; guidance rescale (Lin et al. 2023) needs a reduction, so it is applied here instead.
    """

    def __init__(self, unet, schedule: Schedule, prediction: str, context: torch.Tensor,
                 guidance: float | None = None, rescale: float = 0.0, dtype: torch.dtype = torch.float32):
        self.unet, self.schedule, self.prediction, self.dtype = unet, schedule, prediction, dtype
        self.context = context.to(dtype)  # (2B, L, D) with guidance, else (B, L, D); uncond rows first
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
        out = self.unet(x_in, ts, self.context).float()  # (B or 2B, C, h, w)
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


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    latents: torch.Tensor | None = None  # (B, C, h, w) final latents, when asked
    trajectory: list[list[Image.Image]] = field(default_factory=list)  # per image, predicted x0 at each step


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size on a grid, row by row (cols defaults to a near-square layout); empty cells are white."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def from_pil(image: Image.Image, size: tuple[int, int], device, dtype) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized to size = (width, height)."""
    from .data import to_tensor
    return to_tensor(image.convert("RGB").resize(size, Image.LANCZOS)).unsqueeze(0).to(device, dtype)


class Pipeline:
    """The three modules, the schedule and a sampler, composed."""

    def __init__(self, models: Models, device: str | torch.device = "auto", dtype=None, compile: bool = False):
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.config: ModelConfig = models.config
        self.unet = models.unet.to(self.device, self.dtype).eval()
        self.vae = models.vae.to(self.device, self.dtype).eval()
        self.text = models.text.to(self.device, self.dtype).eval()
        if self.device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
        self.schedule = Schedule.from_config(self.config.diffusion)
        self.checkpoint_path: str | None = None

    @classmethod
    def from_checkpoint(cls, path, device="auto", dtype=None, prediction: str | None = None, ema: bool = False,
                        compile: bool = False, config: ModelConfig | None = None) -> "Pipeline":
        """SD 1.x / 2.x single-file checkpoints and latentdiff checkpoints (config: override the detected one)."""
        dev = pick_device(device)
        models = load_models(path, device=dev, dtype=pick_dtype(dev, dtype), prediction=prediction, ema=ema,
                             config=config)
        pipe = cls(models, dev, dtype, compile=compile)
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
        unique = list(dict.fromkeys(negatives))
        ctx = self.text.encode(list(prompts) + unique, clip_skip=clip_skip)  # one call: one chunk count k
        cond, uncond_unique = ctx[:len(prompts)], ctx[len(prompts):]
        uncond = uncond_unique[torch.tensor([unique.index(n) for n in negatives], device=ctx.device)]
        return torch.cat([uncond, cond])

    @torch.no_grad()
    def denoiser(self, prompts: list[str], negatives: list[str], guidance: float, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None) -> UNetDenoiser:
        """The U-Net conditioned on the prompts, with classifier-free guidance unless guidance is 1."""
        if guidance != 1.0:
            context = self.encode_prompts(prompts, negatives, clip_skip)
        else:  # guidance 1 is the conditional model alone: one batch, the negative prompt plays no part
            context = self.text.encode(prompts, clip_skip=clip_skip)
        return UNetDenoiser(self.unet, self.schedule, self.config.diffusion.prediction, context,
                            guidance if guidance != 1.0 else None, guidance_rescale, self.dtype)

    def check(self, *, steps: int, height: int, width: int, guidance: float, strength: float | None = None):
        """Reject bad settings up front with a message that says how to fix them."""
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"width and height must be positive multiples of {m} for this model "
                             f"(got {width}x{height}); try {max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1 (got {steps})")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number (got {guidance})")
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1] (got {strength})")

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
        self.check(steps=steps, height=height, width=width, guidance=guidance,
                   strength=strength if init_image is not None else None)

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * (len(prompts) // num_images)
        negs = [n for n in negs for _ in range(num_images)]
        if len(negs) != len(prompts):
            raise ValueError(f"got {len(negs) // num_images} negative prompts for {len(prompts) // num_images} prompts")
        B = len(prompts)
        seeds = [seed + i for i in range(B)]
        if generators is None:
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        noise = NoiseSampler(generators)

        denoiser = self.denoiser(prompts, negs, guidance, guidance_rescale, clip_skip)

        sigmas = spec.sigmas(self.schedule, steps)
        shape = (B, self.config.unet.in_channels, height // self.vae.latent_factor, width // self.vae.latent_factor)
        with ops.use_backend(backend):
            if init_image is not None:
                x, sigmas = self._init_from_image(init_image, (width, height), sigmas, strength, noise, shape)
            else:
                # `latents` are the starting noise (unit variance), as in diffusers; scaled to the first sigma here.
                if latents is not None and tuple(latents.shape) != shape:
                    raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
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
        return Result(images, seeds, prompts, x if return_latents else None, traj)

    def _init_from_image(self, image, size, sigmas, strength, noise, shape):
        """img2img: encode, q-sample to the start step with the fused forward op; returns (x, sigmas left).

        The run skips the first (1 - strength) of the steps. The start sigma is snapped up to an integer
        timestep t0 (the forward op takes integer t), and sampling continues from exactly sigma_t0.
        """
        steps = len(sigmas) - 1
        start = steps - max(1, min(steps, int(round(steps * strength))))
        t0 = self.img2img_start(float(sigmas[start]))
        sigmas = torch.cat([self.schedule.sigmas[t0:t0 + 1], sigmas[start + 1:]])
        x0 = self.vae.encode(from_pil(image, size, self.device, self.dtype)).float()
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
        return self.vae.decode(latents.to(self.dtype)).float()
