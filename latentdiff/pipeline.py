"""Text-to-image: text encoder -> latent U-Net denoising from pure noise -> VAE decoder."""
from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from latentdiff.diffusion import ops
from latentdiff.diffusion.inpaint import MaskedDenoiser
from latentdiff.io.adapters import LoraSet, load_embeddings
from latentdiff.io.checkpoint import BUNDLED, Models, build_models, load_models
from latentdiff.io.config import ModelConfig, load_model_config
from latentdiff.io.diffusers_folder import is_diffusers_folder, load_diffusers_folder
from latentdiff.io.files import file_hash, model_name
from latentdiff.io.images import format_parameters, from_pil, image_hash, save_image, to_pil
from latentdiff.io.masks import InpaintOptions, Inpainting, outpaint_canvas, outpaint_sides, outpaint_size, \
    prepare as prepare_inpainting
from latentdiff.diffusion.process import guidance_rescale
from latentdiff.diffusion.samplers import A1111_TITLES, BrownianNoise, NoiseSampler, get_sampler
from latentdiff.diffusion.schedule import SCHEDULES, Schedule
from latentdiff.models.prompts import count_chunks, encode as encode_weighted, encode_dual, prompt_schedule, \
    text_at_call
from latentdiff.models.text_encoder import DualTextEncoder
from latentdiff.models.unet import micro_conditioning
from latentdiff.models.upscalers import BUILT_IN, LATENT_MODES, ModelUpscaler, upscale_image, upscale_latents
from latentdiff.models.vae_tiles import decoder_halo, tileable, tiled_decode, tiled_encode


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
MIN_VAE_TILE = 32  # latents: smaller tiles spend most of their work on the halo
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
NOISE_KINDS = ("gaussian", "brownian")  # where a sampler's per-step noise comes from (Pipeline.__call__'s noise)


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


class ConditioningSchedule:
    """The rows of encoded texts each batch row uses at each model call: A1111's prompt editing and alternation.

    Every distinct text of every prompt's schedule is encoded once (`context`, `y`: one row each); row r of
    the batch follows `schedules[r]` = [(last step, text row)]. As in A1111 a step is a model call (counted from
    0; a second-order sampler's two calls are two steps), and past the last entry the first one applies again.
    """

    def __init__(self, context: torch.Tensor, y: torch.Tensor | None, schedules: list[list[tuple[int, int]]]):
        self.context, self.y, self.schedules = context, y, schedules
        self.calls, self._cache = 0, {}

    @property
    def varies(self) -> bool:
        return any(len(s) > 1 for s in self.schedules)

    def rows(self, call: int) -> tuple[int, ...]:
        return tuple(s[text_at_call(s, call)][1] for s in self.schedules)

    def next(self, dtype: torch.dtype):
        """(context, y) of the next model call: one gather per distinct combination of rows, cached."""
        rows = self.rows(self.calls)
        self.calls += 1
        if rows not in self._cache:
            index = torch.tensor(rows, device=self.context.device)
            self._cache[rows] = (self.context[index].to(dtype), None if self.y is None else self.y[index].to(dtype))
        return self._cache[rows]


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
        # Inpainting U-Nets (9 input channels) also see [mask, masked-image latents] (B, 5, h, w) beside x
        self.concat: torch.Tensor | None = None
        # Prompt editing / alternation: the context (and SDXL vector) of each model call, in call order
        self.conditioning: ConditioningSchedule | None = None

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        c_in = 1.0 / math.sqrt(1.0 + sigma * sigma)  # x_t = x / sqrt(1 + sigma^2), the VP input
        t = float(self.schedule.sigma_to_t(sigma))
        x_in = (x * c_in).to(self.dtype)
        if self.concat is not None:  # after the input scaling: the mask and image latents are not noised
            x_in = torch.cat([x_in, self.concat.to(self.dtype)], dim=1)
        if self.scale is not None:
            x_in = torch.cat([x_in, x_in])
        ts = torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.float32)
        context, y = (self.context, self.y) if self.conditioning is None else self.conditioning.next(self.dtype)
        args = (x_in, ts, context) if y is None else (x_in, ts, context, y)
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


def _out_of_memory(e: BaseException | None) -> bool:
    """Whether an error, or one it was raised while handling (ending a failed capture raises its own), is an OOM."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class GraphedUNet:
    """The U-Net replayed from a CUDA graph per input shape and dtype (Pipeline's default on CUDA).

    An SD U-Net call is about a thousand small kernels; at batch 2 and 512x512 a large GPU runs them faster than
    the host can launch them one by one. A graph launches them all at once: inputs are copied into the graph's
    own tensors, the recorded kernels replay, and the output is copied out (a replay overwrites it).

    Each graph holds a private memory pool as large as one forward's activations, and a server's clients vary the
    size, batch, guidance and prompt length, so graphs are kept least-recently-used first within `budget` bytes of
    pools (default: a quarter of the device) and `max_graphs`; an evicted graph's pool goes back to the device. A
    shape whose capture runs out of memory runs eagerly from then on while the others stay graphed; any other
    capture failure (an op that cannot be captured) turns graphs off, with one warning.

    `capture(args) -> (inputs, output, graph, pool_bytes)` and `release()` are the CUDA side, replaceable so that
    the policy can be tested without a GPU.
    """

    MAX_EAGER_SHAPES = 256  # shapes remembered as too large to capture (older ones are tried again)

    def __init__(self, unet: torch.nn.Module, budget: int | None = None, max_graphs: int = 32, capture=None,
                 release=None):
        self.unet, self.budget, self.max_graphs = unet, budget, max_graphs
        self.graphs: collections.OrderedDict = collections.OrderedDict()  # key -> (inputs, output, graph, bytes)
        self.eager_shapes: collections.OrderedDict = collections.OrderedDict()  # keys whose capture ran out of memory
        self.failed = False
        self.capture = capture or self._capture
        self.release = release or torch.cuda.empty_cache

    @property
    def pool_bytes(self) -> int:
        """Device memory the kept graphs hold in their private pools (no other allocation can use it)."""
        return sum(entry[3] for entry in self.graphs.values())

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if self.failed or torch.is_grad_enabled() or key in self.eager_shapes:
            return self.unet(*args)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._add(key, args)
            if entry is None:
                return self.unet(*args)
        else:
            self.graphs.move_to_end(key)
        inputs, output, graph, _ = entry
        for dst, src in zip(inputs, args):
            dst.copy_(src)
        graph.replay()
        return output.clone()

    def _add(self, key, args):
        """Capture a graph for a new shape and make room for it; None when this shape (or every shape) runs eagerly."""
        try:
            entry = self.capture(args)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if _out_of_memory(e):
                self.eager_shapes[key] = None
                while len(self.eager_shapes) > self.MAX_EAGER_SHAPES:
                    self.eager_shapes.popitem(last=False)
                warnings.warn(f"latentdiff: no memory for a CUDA graph of input shapes {[s for s, _ in key]}; "
                              "that shape runs eagerly")
            else:
                self.failed = True
                self.graphs.clear()
                warnings.warn(f"latentdiff: CUDA graph capture failed ({first}); running the U-Net eagerly")
            self.release()  # whatever the failed capture reserved
            return None
        self.graphs[key] = entry
        if self.budget is None:
            self.budget = torch.cuda.get_device_properties(args[0].device).total_memory // 4
        evicted = False
        while len(self.graphs) > 1 and (len(self.graphs) > self.max_graphs or self.pool_bytes > self.budget):
            self.graphs.popitem(last=False)  # least recently used; the new graph is the most recent
            evicted = True
        if evicted:
            self.release()  # a dropped graph's pool returns to the device only when the cache is emptied
        return entry

    def _capture(self, args):
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: library handles and algorithm choices are made here
            for _ in range(2):
                self.unet(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        device = inputs[0].device
        before = torch.cuda.memory_reserved(device)
        with torch.cuda.graph(graph):
            output = self.unet(*inputs)
        return inputs, output, graph, torch.cuda.memory_reserved(device) - before


class Interrupted(Exception):
    """Raised by a step callback to stop a Pipeline call, which then returns the images as far as they got."""


def sampler_title(spec) -> str:
    """A1111's name for a sampler, with the schedule its name asked for, whatever spelling found it: 'DPM++ 2M
    Karras' for dpmpp_2m_karras or k_dpmpp_2m_ka; get_sampler reads it back."""
    title = A1111_TITLES.get(spec.name, spec.name)
    return title if spec.sigma_kind == "default" else f"{title} {SCHEDULES[spec.sigma_kind]}"


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: after the first pass, upscale it (its latents, or its decoded picture) and run an img2img
    pass of `steps` sampler steps (0: the first pass's count) at `strength` there.

    The size is scale x the first pass's, or resize_x / resize_y (A1111's hr_resize_x/y: one of them keeps the
    aspect ratio, both crop to theirs). upscaler: a name of models.upscalers.BUILT_IN or a loaded ModelUpscaler;
    sampler, prompt, negative_prompt: None for the first pass's.
    """
    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    steps: int = 0
    strength: float = 0.7
    upscaler: str | ModelUpscaler = "Latent"
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    @property
    def upscaler_name(self) -> str:
        return self.upscaler.name if isinstance(self.upscaler, ModelUpscaler) else self.upscaler

    def check(self, num_timesteps: int):
        """ValueError naming the setting and its range (sizes are checked by Pipeline.check once computed)."""
        if not isinstance(self.upscaler, ModelUpscaler) and self.upscaler not in BUILT_IN:
            raise ValueError(f"unknown hires upscaler {self.upscaler!r}: choose one of {', '.join(BUILT_IN)}, or a "
                             f"network file (.pth / .safetensors)")
        if not (math.isfinite(self.scale) and 1.0 <= self.scale <= 8.0):
            raise ValueError(f"hires scale must be in 1..8 (got {self.scale})")
        if self.resize_x < 0 or self.resize_y < 0:
            raise ValueError(f"hires resize must be 0 (use the scale) or a number of pixels (got "
                             f"{self.resize_x}x{self.resize_y})")
        if not 0 <= self.steps <= num_timesteps:
            raise ValueError(f"hires steps must be in 0..{num_timesteps}, 0 for the first pass's (got {self.steps})")
        if not (math.isfinite(self.strength) and 0.0 < self.strength <= 1.0):
            raise ValueError(f"hires denoising strength must be in (0, 1] (got {self.strength})")
        if self.sampler is not None:
            get_sampler(self.sampler)

    def sizes(self, width: int, height: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((w, h) the first pass is upscaled to, (w, h) of the second pass), each rounded down to the multiple:
        the same unless both resize values change the aspect ratio, when the second is a centred crop."""
        rx, ry = self.resize_x, self.resize_y
        if not rx and not ry:
            up = target = (int(width * self.scale), int(height * self.scale))
        elif not ry:
            up = target = (rx, rx * height // width)
        elif not rx:
            up = target = (ry * width // height, ry)
        else:  # cover the requested box at the first pass's aspect ratio, then crop to it
            target = (rx, ry)
            up = (rx, rx * height // width) if width / height < rx / ry else (ry * width // height, ry)
        down = lambda v: max(multiple, v // multiple * multiple)  # noqa: E731
        return (down(up[0]), down(up[1])), (down(target[0]), down(target[1]))

    def infotext(self, sampler: str, prompt: str, negative: str) -> dict:
        """A1111's hires keys for a first pass of this sampler and prompts ("Denoising strength" is written apart)."""
        out = ({"Hires resize": f"{self.resize_x}x{self.resize_y}"} if self.resize_x or self.resize_y
               else {"Hires upscale": self.scale})
        if self.steps:
            out["Hires steps"] = self.steps
        out["Hires upscaler"] = self.upscaler_name
        if self.sampler is not None and sampler_title(get_sampler(self.sampler)) != sampler:
            out["Hires sampler"] = sampler_title(get_sampler(self.sampler))
        if self.prompt is not None and self.prompt != prompt:
            out["Hires prompt"] = self.prompt
        if self.negative_prompt is not None and self.negative_prompt != negative:
            out["Hires negative prompt"] = self.negative_prompt
        return out


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    latents: torch.Tensor | None = None  # (B, C, h, w) final latents, when asked
    trajectory: list[list[Image.Image]] = field(default_factory=list)  # per image, predicted x0 at each step
    params: list[dict] = field(default_factory=list)  # per image, the settings io.images.format_parameters writes
    checkpoint: str | None = None  # the model file, hashed for `Model hash:` only when the parameters are asked for
    interrupted: bool = False  # a callback raised Interrupted: images holds those finished and the running x0s
    notes: list[str] = field(default_factory=list)  # what was adjusted on the way (a mask resized to the picture)

    @property
    def infotexts(self) -> list[str]:
        """A1111's `parameters` text of each image: what `generate` writes into its PNGs."""
        # a diffusers folder has no one file to hash
        extra = {"model_hash": file_hash(self.checkpoint)} if self.checkpoint and Path(self.checkpoint).is_file() else {}
        return [format_parameters({**p, **extra}) for p in self.params]

    def save(self, path, index: int = 0) -> Path:
        """Write image `index` as a PNG carrying its `parameters` chunk, as `generate` does (atomically)."""
        path = Path(path)
        save_image(self.images[index], path, self.infotexts[index])
        return path


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
        self.prediction_override: str | None = None  # recorded in the PNG parameters: the weights cannot show it
        # LoRA / LyCORIS adapters: Pipeline.load_lora, and <lora:NAME:w> in prompts (NAME in self.loras.dirs)
        self.loras = LoraSet(getattr(self.unet, "_orig_mod", self.unet), self.text)
        self.embeddings, self.embeddings_skipped = {}, {}  # textual inversion: set_embeddings_dirs

    @classmethod
    def from_checkpoint(cls, path=None, device="auto", dtype=None, prediction: str | None = None, ema: bool = False,
                        compile: bool = False, config: ModelConfig | None = None, cuda_graphs: bool = True) -> "Pipeline":
        """SD 1.x / 2.x / XL single-file checkpoints and latentdiff checkpoints (config: override the detected one);
        without a path, the bundled emoji model."""
        path = BUNDLED if path is None else path
        dev = pick_device(device)
        check_dtype(dev, pick_dtype(dev, dtype))
        if is_diffusers_folder(path):  # model_index.json, unet/, vae/, text_encoder/ ...: read offline
            models = load_diffusers_folder(path, device=dev, dtype=pick_dtype(dev, dtype), prediction=prediction)
        else:
            models = load_models(path, device=dev, dtype=pick_dtype(dev, dtype), prediction=prediction, ema=ema,
                                 config=config)
        pipe = cls(models, dev, dtype, compile=compile, cuda_graphs=cuda_graphs)
        pipe.checkpoint_path, pipe.prediction_override = str(path), prediction
        return pipe

    @classmethod
    def from_config(cls, config: ModelConfig | str, device="auto", dtype=None, seed: int = 0) -> "Pipeline":
        """A randomly initialised model from a config (for tests and benchmarks: speed needs no weights)."""
        if not isinstance(config, ModelConfig):
            config = load_model_config(config)
        torch.manual_seed(seed)
        return cls(build_models(config), device, dtype)

    def load_lora(self, path, weight: float = 1.0, te_weight: float | None = None) -> None:
        """Apply a LoRA / LoCon / LoHa / LoKr / DoRA / diffusers-PEFT file until unload_lora (U-Net multiplier
        `weight`, text encoders `te_weight`, default the same); a file that does not fit raises AdapterError (a
        ValueError) naming it and why, with nothing applied."""
        self.loras.load(path, weight, te_weight)

    def set_embeddings_dirs(self, dirs) -> None:
        """Textual inversion: every embedding in these folders that fits the text encoders is used by its file name
        in prompts (self.embeddings lists them, self.embeddings_skipped the others and why; one warning for those)."""
        self.embeddings, self.embeddings_skipped = load_embeddings(dirs, self.text)
        if self.embeddings_skipped:
            reasons = [v["error"] for v in self.embeddings_skipped.values()]
            warnings.warn(f"{len(reasons)} embeddings skipped: {'; '.join(reasons[:3])}"
                          f"{'; ...' if len(reasons) > 3 else ''}", stacklevel=2)

    def unload_lora(self, path=None) -> None:
        """Remove one loaded adapter (or, without a path, all): every weight is its original again, bit for bit."""
        self.loras.unload(path)

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
    def encode_schedules(self, prompts: list[str], negatives: list[str] | None, clip_skip: int | None, steps: int):
        """A1111's prompt syntax: (context, pooled, schedules) with one row per distinct text of every prompt's
        schedule (models.prompts.prompt_schedule), encoded once with its emphasis weights, and each batch row's
        [(last step, row)], rows ordered [uncond; cond] as encode_prompts_pooled orders them."""
        batch = ([] if negatives is None else [(n, True) for n in negatives]) + [(p, False) for p in prompts]
        keys: dict[tuple[str, bool], int] = {}  # (text, empty SDXL negative) -> row
        schedules = []
        for text, negative in batch:
            rows = []
            for end, variant in prompt_schedule(text, steps):
                rows.append((end, keys.setdefault((variant, negative and variant == ""), len(keys))))
            schedules.append(rows)
        texts = [t for t, _ in keys]
        if isinstance(self.text, DualTextEncoder):
            ctx, pooled = encode_dual(self.text, texts, clip_skip)
            # SDXL base samples an empty negative prompt as zeros, context and pooled (see encode_prompts_pooled)
            empty = torch.tensor([z for _, z in keys], device=ctx.device)
            ctx, pooled = ctx.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)
        else:
            ctx, pooled = encode_weighted(self.text, texts, clip_skip)
        return ctx, pooled, schedules

    @torch.no_grad()
    def denoiser(self, prompts: list[str], negatives: list[str], guidance: float, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, size: tuple[int, int] | None = None, steps: int = 1,
                 prompt_syntax: bool = True) -> UNetDenoiser:
        """The U-Net conditioned on the prompts, with classifier-free guidance unless guidance is 1.

        size: (height, width) of the image in pixels, SDXL's micro-conditioning (default: the model's size).
        prompt_syntax: A1111's (emphasis:1.2), BREAK, [prompt:editing:steps] and [alter|nation] over `steps`
        steps; False encodes the prompts exactly as written.
        """
        # guidance 1 is the conditional model alone: one batch, the negative prompt plays no part
        negs = negatives if guidance != 1.0 else None
        schedules = None
        if prompt_syntax:
            context, pooled, schedules = self.encode_schedules(prompts, negs, clip_skip, steps)
        else:
            context, pooled = self.encode_prompts_pooled(prompts, negs, clip_skip)
        y = None
        if pooled is not None:
            # SDXL: original size = target size = the requested size, crop (0, 0) (Podell et al. 2023, 2.2)
            h, w = size or (self.config.image_size, self.config.image_size)
            sizes = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=pooled.device)
            y = micro_conditioning(pooled, sizes.expand(pooled.shape[0], -1))
        plan = None if schedules is None else ConditioningSchedule(context, y, schedules)
        if plan is not None:  # the rows of the first call; later ones come from the plan when they change
            index = torch.tensor(plan.rows(0), device=context.device)
            context, y = context[index], None if y is None else y[index]
        den = UNetDenoiser(self.unet_call, self.schedule, self.config.diffusion.prediction, context,
                           guidance if guidance != 1.0 else None, guidance_rescale, self.dtype, y)
        den.conditioning = plan if plan is not None and plan.varies else None
        return den

    def image_bytes(self, height: int, width: int, guidance: float, tokens: int | None = None) -> int:
        """Peak activation memory one image needs, an upper estimate: the U-Net's (twice with CFG), then the VAE's.

        U-Net: every skip connection lives until its output block, beside a dozen channel-widths of the widest
        level being computed (GEGLU's 8x inner width and its product), and the prompt's context of `tokens` tokens
        (default: one 77-token chunk; long prompts add 77 per 75-token chunk) with its keys and values at the widest
        attention, twice (attention may copy them to split the heads). VAE decoder: six tensors of the widest
        channel count at each resolution (SD 2.1 at 512x512 in fp16 measured 0.60 GiB on an H200, this gives 0.75).
        Attention is counted as linear in the tokens: SDPA's flash and memory-efficient kernels never form the full
        score matrix.
        """
        size = torch.finfo(self.dtype).bits // 8
        u = self.config.unet
        f = self.vae.latent_factor
        h, w = -(-height // f), -(-width // f)
        skips, widest = u.model_channels * h * w, 0
        for level, mult in enumerate(u.channel_mult):
            n, c = (-(-h // 2**level)) * (-(-w // 2**level)), mult * u.model_channels
            skips += u.num_res_blocks * c * n + (c * n // 4 if level < len(u.channel_mult) - 1 else 0)
            widest = max(widest, c * n)
        tokens = self.config.text.context_length if tokens is None else tokens
        context = tokens * (u.context_dim + 4 * max(u.channel_mult) * u.model_channels)
        unet = (1 if guidance == 1.0 else 2) * (skips + 12 * widest + context) * size
        # the VAE decodes in tiles when a whole picture does not fit (Pipeline.decode)
        vae = min(self.vae_bytes(height, width), self.vae_bytes(height, width, tile=MIN_VAE_TILE))
        latents = 4 * u.in_channels * h * w * 4  # x, the denoised estimate, noise and the step's output, float32
        return max(unet, vae) + latents

    def vae_bytes(self, height: int, width: int, tile: int | None = None) -> int:
        """Peak activation memory of the VAE on one picture: whole, six tensors of the widest channel count at each
        resolution (SD 2.1 at 512x512 in fp16 measured 0.60 GiB on an H200, this gives 0.75); or in tiles of
        `tile` latents (models/vae_tiles.py): on a GPU one tile with its halo at a time (the others wait in host
        memory), on the CPU all tiles' two running tensors at the widest level, halos included."""
        v, f = self.config.vae, self.vae.latent_factor
        if tile is not None:
            if not tileable(self.vae):
                return self.vae_bytes(height, width)
            side = (tile + 2 * decoder_halo(self.vae)) * f
            if self.device.type != "cpu":
                return self.vae_bytes(min(side, height), min(side, width))
            grow = (side / (tile * f)) ** 2
            return int(self.vae_bytes(height, width) / 3 * grow)
        need = 0
        for level, mult in enumerate(v.ch_mult):
            n = (-(-height // 2**level)) * (-(-width // 2**level))
            c = v.ch * max(v.ch_mult[level:level + 2])  # the level's own width and what the level above brings up
            need = max(need, 6 * c * n * (torch.finfo(self.vae_dtype).bits // 8))
        return need

    def vae_tile(self, height: int, width: int, batch: int = 1) -> int | None:
        """How the VAE takes `batch` pictures of this size: None (whole, in one batch), 0 (whole, one by one), or a
        tile size in latents that fits the memory available."""
        have = available_memory(self.device)
        if have is None:
            return None
        if isinstance(self.unet_call, GraphedUNet):
            have = max(0, have - self.unet_call.pool_bytes)
        whole = self.vae_bytes(height, width)
        if batch * whole <= 0.8 * have:
            return None
        if whole <= 0.8 * have or not tileable(self.vae):
            return 0
        for tile in (128, 96, 64, 48, MIN_VAE_TILE):
            if self.vae_bytes(height, width, tile) <= 0.8 * have:
                return tile
        return MIN_VAE_TILE

    def max_batch(self, height: int, width: int, guidance: float, tokens: int | None = None) -> int:
        """How many images one pass may hold at once; refuses a size no batch fits, naming both numbers."""
        need, have = self.image_bytes(height, width, guidance, tokens), available_memory(self.device)
        if have is None:
            return 1 << 30
        if isinstance(self.unet_call, GraphedUNet):  # graph pools are reserved memory no other tensor can use
            have = max(0, have - self.unet_call.pool_bytes)
        if need > have:
            raise ValueError(f"a {width}x{height} image needs about {gib(need)} of activations but {self.device} has "
                             f"{gib(have)} available; choose a smaller --width/--height")
        return max(1, int(0.7 * have) // need)

    def check(self, *, steps: int, height: int, width: int, guidance: float, strength: float | None = None,
              seed: int = 0, count: int = 1, tokens: int | None = None):
        """Reject bad settings up front with a message that says how to fix them (tokens: as image_bytes)."""
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"width and height must be positive multiples of {m} for this model "
                             f"(got {width}x{height}); try {max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}")
        if not 1 <= steps <= self.schedule.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.schedule.num_timesteps} for this model (got {steps})")
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0 (got {guidance}); 1 is the prompt alone, no "
                             f"guidance, and 0 the unconditional model")
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1] (got {strength})")
        if not 0 <= seed or seed + count - 1 > MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED - count + 1} for {count} image(s), one seed each "
                             f"(got {seed})")
        self.max_batch(height, width, guidance, tokens)

    def context_tokens(self, texts: list[str], steps: int = 1, prompt_syntax: bool = True) -> int:
        """The length of the context these prompts are encoded into together over `steps` steps: 77 tokens per
        chunk of the longest, as the encoder cuts it (models.prompts.count_chunks: BREAK, commas, embeddings)."""
        enc = getattr(self.text, "clip_l", self.text)  # SDXL's two encoders cut prompts into the same chunks
        return count_chunks(enc, texts, steps, prompt_syntax) * enc.config.context_length

    def hires_tokens(self, hires: Hires | None, texts: list[str], negs: list[str], steps: int, guidance: float,
                     prompt_syntax: bool = True) -> int | None:
        """The context of the hires pass (as context_tokens), or None without one: its own prompts, the first
        pass's where it has none, over its own steps; it may be longer than the first pass's."""
        if hires is None:
            return None
        hires.check(self.schedule.num_timesteps)  # its steps bound the schedule read here
        texts = texts if hires.prompt is None else [hires.prompt]
        negs = negs if hires.negative_prompt is None else [hires.negative_prompt]
        return self.context_tokens(texts + (negs if guidance != 1.0 else []), hires.steps or steps, prompt_syntax)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int | None = None,
                 sampler: str | None = None, guidance: float | None = None, guidance_rescale: float = 0.0,
                 height: int | None = None, width: int | None = None, num_images: int = 1, seed: int = 0,
                 generators: list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 init_image: Image.Image | None = None, strength: float = 0.75, clip_skip: int | None = None,
                 callback=None, trajectory: bool = False, return_latents: bool = False,
                 progress: bool = True, backend: str | None = None, mask: Image.Image | None = None,
                 inpaint: InpaintOptions | None = None, hires: Hires | None = None,
                 prompt_syntax: bool = True, outpaint: tuple[int, int, int, int] | None = None,
                 noise: str = "gaussian") -> Result:
        """Generate num_images per prompt; image i of the batch uses seed + i (batch-invariant).

        prompt_syntax: read A1111's prompt syntax (emphasis, BREAK, prompt editing, alternation; models/prompts.py);
        False encodes the prompts exactly as written.

        noise: where the sampler's per-step noise comes from. "gaussian": each image's seeded stream, which also
        draws the starting noise; "brownian": a Brownian tree per image seeded with its seed, over the sigmas each
        pass samples (k-diffusion's BrownianTreeNoiseSampler, A1111's for its SDE samplers; needs torchsde), so that
        the same seed follows the same noise path whatever the step count. The starting noise is the same for both.

        mask (with init_image): repaint where it is white (io/masks.py; inpaint: A1111's options), on an
        inpainting U-Net (9 input channels) or any other; hires: a second pass at a larger size (Hires).
        outpaint (with init_image, no mask): (left, right, top, bottom) pixels to grow the canvas by (rounded up to
        the model's multiple, io.masks.outpaint_canvas); the new area is the mask, painted as inpaint.fill says, and
        without width/height the canvas's size is the processing size. What `generate --outpaint` runs.

        callback(info) runs after each step with the sampler's {"i", "sigma", "x", "denoised"} and "part": (k, n),
        the k-th of the n batches the images are split into to fit the device, and "steps": the sampler steps each
        batch takes (fewer than `steps` in img2img). Raising Interrupted there stops the call: it returns the images
        finished so far and the running batch's predicted x0, with `interrupted` set.
        """
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_KINDS)} (got {noise!r})")
        if noise == "brownian":
            BrownianNoise.torchsde()  # missing: the one-line ValueError now, before any work
        d = self.config.sampling
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        spec = get_sampler(d.sampler if sampler is None else sampler)
        picture = init_image  # the outpainted picture is recorded as given, with the sides
        if outpaint is not None:
            outpaint = self._outpaint_sides(outpaint, init_image, mask)
            canvas = outpaint_size(init_image.size, outpaint, self.size_multiple)
            width, height = width or canvas[0], height or canvas[1]
        height = height or self.config.image_size
        width = width or self.config.image_size
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * (len(prompts) // num_images)
        negs = [n for n in negs for _ in range(num_images)]
        if len(negs) != len(prompts):
            raise ValueError(f"got {len(negs) // num_images} negative prompts for {len(prompts) // num_images} prompts")
        B = len(prompts)
        texts, lora_hashes = self.loras.activate(prompts)  # <lora:NAME:w> tags applied, and taken out of the text
        # guidance 1 encodes no negative prompt; steps past the schedule are refused by check, not read here
        tokens = self.context_tokens(texts + (negs if guidance != 1.0 else []),
                                     min(steps, self.schedule.num_timesteps), prompt_syntax)
        self.check(steps=steps, height=height, width=width, guidance=guidance,
                   strength=strength if init_image is not None else None, seed=seed, count=B, tokens=tokens)
        if outpaint is not None:  # built once the size is checked: the canvas may be large
            init_image, mask = outpaint_canvas(init_image, *outpaint, multiple=self.size_multiple)
        job = self._inpainting(init_image, mask, inpaint, (width, height))
        hires_tokens = self.hires_tokens(hires, texts, negs, steps, guidance, prompt_syntax)
        hires_sizes = self.hires_sizes(hires, width, height, init_image, steps, guidance, hires_tokens)
        seeds = [seed + i for i in range(B)]
        if generators is None:
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        shape = (B, self.latent_channels, height // self.vae.latent_factor, width // self.vae.latent_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")

        # Images are independent (one generator each), so a batch too large for the device runs in chunks
        # and gives the same images.
        chunk = self.max_batch(height, width, guidance, tokens)
        if hires_sizes is not None:  # the second pass runs on the same chunks
            chunk = min(chunk, self.max_batch(hires_sizes[1][1], hires_sizes[1][0], guidance, hires_tokens))
        settings = dict(spec=spec, steps=steps, guidance=guidance, guidance_rescale=guidance_rescale,
                        size=(width, height), init_image=init_image, strength=strength, clip_skip=clip_skip,
                        callback=callback, trajectory=trajectory, progress=progress, backend=backend,
                        inpainting=job, hires=None if hires is None else (hires, hires_sizes),
                        prompt_syntax=prompt_syntax)
        starts = range(0, B, chunk)
        tree_seeds = seeds if noise == "brownian" else None
        images, finals, traj, interrupted = [], [], [], False
        for k, i in enumerate(starts):
            j = min(B, i + chunk)
            out = self._sample(texts[i:j], negs[i:j], generators[i:j], None if latents is None else latents[i:j],
                               (j - i,) + shape[1:], part=(k, len(starts)),
                               tree_seeds=None if tree_seeds is None else tree_seeds[i:j], **settings)
            images += out[0]
            finals.append(out[1])
            traj += out[2]
            if out[3]:  # the batches after an interrupted one never start
                interrupted = True
                break
        base = dict(steps=steps, sampler=sampler_title(spec), guidance=guidance, width=width, height=height,
                    model=model_name(self.checkpoint_path) if self.checkpoint_path else self.config.name,
                    strength=strength if init_image is not None else hires.strength if hires else None,
                    init_image_hash=image_hash(picture) if picture is not None else None, clip_skip=clip_skip,
                    guidance_rescale=guidance_rescale, prediction=self.prediction_override,
                    dtype=DTYPE_NAMES[self.dtype], lora_hashes=lora_hashes)
        extra = {} if job is None else {**job.options.infotext(), "Mask hash": image_hash(mask)}
        if outpaint is not None:  # the picture and the sides rebuild the canvas and its mask (--from-png)
            extra = {**job.options.infotext(), "Outpaint": ",".join(map(str, outpaint))}
        if not prompt_syntax:  # so that --from-png encodes the prompt as written again
            extra["Prompt syntax"] = "off"
        if noise != "gaussian":
            extra["Noise"] = noise.capitalize()
        params = [dict(base, prompt=p, negative=n, seed=s,
                       extra=dict(extra, **(hires.infotext(base["sampler"], p, n) if hires else {})))
                  for p, n, s in zip(prompts, negs, seeds)]
        done = len(images)  # all of them unless interrupted
        return Result(images, seeds[:done], prompts[:done], torch.cat(finals) if return_latents else None, traj,
                      params[:done], self.checkpoint_path, interrupted=interrupted,
                      notes=[] if job is None else job.notes)

    def _sample(self, prompts, negs, generators, latents, shape, *, part, spec, steps, guidance, guidance_rescale,
                size, init_image, strength, clip_skip, callback, trajectory, progress, backend, inpainting=None,
                hires=None, prompt_syntax=True, tree_seeds=None):
        """One batch that fits the device: (PIL images, final latents, per-image trajectories, interrupted); an
        interrupted batch gives its last predicted x0. tree_seeds: the sampler's per-step noise comes from a
        Brownian tree per image over the sigmas of each pass; the starting noise still from the generators."""
        noise = NoiseSampler(generators)
        denoiser = self.denoiser(prompts, negs, guidance, guidance_rescale, clip_skip, size=(size[1], size[0]),
                                 steps=steps, prompt_syntax=prompt_syntax)
        sigmas = spec.sigmas(self.schedule, steps, sdxl=isinstance(self.text, DualTextEncoder))
        B = shape[0]
        with ops.use_backend(backend):
            if inpainting is not None:
                x, sigmas, denoiser = self._start_inpainting(inpainting, denoiser, sigmas, strength, noise, shape)
            elif init_image is not None:
                x, sigmas = self._init_from_image(init_image, size, sigmas, strength, noise, shape)
            else:
                # `latents` are the starting noise (unit variance), as in diffusers; scaled to the first sigma here.
                start = noise(torch.empty(shape, device=self.device)) if latents is None else latents.to(self.device, torch.float32)
                x = start * math.sqrt(1.0 + float(sigmas[0]) ** 2)
            if self.inpainting_model and denoiser.concat is None:  # no mask: all of the picture is repainted
                denoiser.concat = self._unmasked_concat(shape)

            track: list[torch.Tensor] = []
            last: list[torch.Tensor] = []
            # the hires fix's second pass continues the count: "i" and "steps" cover both passes
            done, n_steps = 0, len(sigmas) - 1 + (self._hires_steps(hires[0], steps) if hires else 0)

            def on_step(info):
                if trajectory:
                    track.append(info["denoised"])
                last[:] = [info["denoised"]]
                if callback is not None:
                    callback(dict(info, i=info["i"] + done, part=part, steps=n_steps))

            def run(denoiser, x, sigmas, spec):
                steps_noise = noise if tree_seeds is None else BrownianNoise.over(x, sigmas, tree_seeds)
                try:
                    return spec.fn(denoiser, x, sigmas, noise=steps_noise, callback=on_step, disable=not progress,
                                   **spec.options(self.schedule)), False
                except Interrupted:  # raised by the callback, so after a step: `last` holds that step's x0 estimate
                    return last[0], True

            x, interrupted = run(denoiser, x, sigmas, spec)
            if hires is not None and not interrupted:
                denoiser, x, sigmas, spec = self._start_hires(x, *hires, noise, prompts, negs, guidance,
                                                              guidance_rescale, clip_skip, spec, steps,
                                                              prompt_syntax=prompt_syntax)
                done = n_steps - (len(sigmas) - 1)
                x, interrupted = run(denoiser, x, sigmas, spec)
            images = to_pil(self.decode(x))
            if inpainting is not None:
                images = [inpainting.paste_back(im) for im in images]
        traj = []
        if trajectory:
            frames = [to_pil(self.decode(dn)) for dn in track]  # per step, a list over the batch
            frames = [[im.resize(images[0].size, Image.NEAREST) for im in f] for f in frames]  # hires: two sizes
            traj = [[f[i] for f in frames] for i in range(B)]
        return images, x, traj, interrupted

    def _init_from_image(self, image, size, sigmas, strength, noise, shape):
        """img2img: encode, q-sample to the start step with the fused forward op; returns (x, sigmas left).

        The run skips the first (1 - strength) of the steps. The start sigma is snapped up to an integer
        timestep t0 (the forward op takes integer t), and sampling continues from exactly sigma_t0.
        """
        steps = len(sigmas) - 1
        x0 = self.encode(from_pil(image, size, self.device, self.vae_dtype))
        x0 = x0.expand(shape[0], -1, -1, -1).contiguous()
        return self._noised(x0, sigmas, max(1, min(steps, int(round(steps * strength)))), noise)

    def _noised(self, x0, sigmas, run: int, noise, multiplier: float = 1.0):
        """x0 noised to the start of the last `run` steps of `sigmas` (snapped up to an integer timestep t0):
        (x in sigma space, the sigmas left, from exactly sigma_t0). multiplier scales the noise (A1111's initial
        noise multiplier)."""
        start = len(sigmas) - 1 - run
        t0 = self.img2img_start(float(sigmas[start]))
        sigmas = torch.cat([self.schedule.sigmas[t0:t0 + 1], sigmas[start + 1:]])
        sqrt_ab, sqrt_1m_ab = self.schedule.tables(self.device)
        t = torch.full((x0.shape[0],), t0, device=self.device, dtype=torch.int64)
        eps = noise(x0)
        x_t = ops.q_sample(x0, eps if multiplier == 1.0 else eps * multiplier, t, sqrt_ab, sqrt_1m_ab)
        return x_t * math.sqrt(1.0 + float(sigmas[0]) ** 2), sigmas  # into sigma space: x = x_t / sqrt(abar)

    def img2img_start(self, sigma: float) -> int:
        """The smallest integer timestep whose sigma is at least `sigma`."""
        # Rounding to the nearest could go below sigma, down to the next sigma of a dense schedule (many Karras
        # steps, small strength); the sigmas must stay strictly descending.
        t = float(self.schedule.sigma_to_t(sigma))
        return min(math.ceil(t - 1e-9), self.schedule.num_timesteps - 1)

    # Inpainting and the hires fix ------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.unet.out_channels

    @property
    def inpainting_model(self) -> bool:
        """An inpainting U-Net: x, the mask and the masked picture's latents in, stacked on the channels."""
        return self.config.unet.in_channels == 2 * self.latent_channels + 1

    @staticmethod
    def _outpaint_sides(outpaint, init_image, mask) -> tuple[int, int, int, int]:
        """outpaint's sides checked (a ValueError of one line, as generate's --outpaint errors)."""
        if init_image is None:
            raise ValueError("outpaint needs the picture to paint on: pass init_image (--init-image FILE)")
        if mask is not None:
            raise ValueError("outpaint makes its own mask (the new border): leave out the mask, or outpaint")
        return outpaint_sides(outpaint)

    def _inpainting(self, init_image, mask, options, size) -> Inpainting | None:
        """The masked job's pictures (io/masks.py), or None without a mask; MaskError (a ValueError) for a bad mask."""
        if mask is None:
            if options is not None and options.noise_multiplier != 1.0:
                raise ValueError("the initial noise multiplier applies to masked img2img only: add a mask")
            return None
        if init_image is None:
            raise ValueError("a mask needs the picture it masks: pass init_image (--init-image FILE)")
        return prepare_inpainting(init_image, mask, size, options or InpaintOptions())

    def hires_sizes(self, hires, width, height, init_image, steps, guidance, tokens):
        """((w, h) upscaled to, (w, h) of the second pass) with both checked against the model, or None (tokens:
        the second pass's context, hires_tokens)."""
        if hires is None:
            return None
        if init_image is not None:
            raise ValueError("the hires fix is a second pass of text-to-image: leave out the init image, or "
                             "ask for the larger size in img2img directly")
        hires.check(self.schedule.num_timesteps)
        up, target = hires.sizes(width, height, self.size_multiple)
        self.check(steps=hires.steps or steps, height=target[1], width=target[0], guidance=guidance, tokens=tokens)
        return up, target

    def _start_inpainting(self, job: Inpainting, denoiser, sigmas, strength, noise, shape):
        """Masked img2img's start: (x, sigmas left, the denoiser). An inpainting U-Net is told the mask and the
        masked picture (as diffusers' and A1111's pipelines feed it), and at strength 1 starts from pure noise as
        diffusers does; any other keeps the known region at each step (MaskedDenoiser) and starts, as A1111, from
        the picture noised to the first sigma, so that region stays the original noised to each step's sigma."""
        B, _, h, w = shape
        image = from_pil(job.image, job.image.size, self.device, self.vae_dtype)  # (1, 3, H, W)
        x0 = self.encode(image).expand(B, -1, -1, -1).contiguous()
        repaint = job.latent_mask(h, w, self.device)  # (1, 1, h, w): 1 where the latents are repainted
        if job.options.fill == "latent noise":
            x0 = torch.lerp(x0, noise(x0), repaint)
        elif job.options.fill == "latent nothing":
            x0 = x0 * (1 - repaint)
        if self.inpainting_model:
            pixels = job.pixel_mask(self.device)
            masked = self.encode(image * (1 - pixels).to(image.dtype))  # masked pixels are 0 (grey)
            small = torch.nn.functional.interpolate(pixels, size=(h, w))  # nearest, as both reference pipelines
            denoiser.concat = torch.cat([small, masked], dim=1).expand(B, -1, -1, -1)
        else:
            denoiser = MaskedDenoiser(denoiser, x0, 1 - repaint)
        multiplier = job.options.noise_multiplier
        if strength >= 1.0 and self.inpainting_model:
            return noise(x0) * multiplier * math.sqrt(1.0 + float(sigmas[0]) ** 2), sigmas, denoiser
        steps = len(sigmas) - 1
        x, sigmas = self._noised(x0, sigmas, max(1, min(steps, int(round(steps * strength)))), noise, multiplier)
        return x, sigmas, denoiser

    def _unmasked_concat(self, shape) -> torch.Tensor:
        """An inpainting U-Net's extra input when all of the picture is repainted (txt2img, the hires pass): a mask
        of ones and the latents of an all-grey (fully masked) picture."""
        B, _, h, w = shape
        f = self.vae.latent_factor
        grey = torch.zeros(1, 3, h * f, w * f, device=self.device, dtype=self.vae_dtype)
        return torch.cat([torch.ones(1, 1, h, w, device=self.device), self.encode(grey)], 1).expand(B, -1, -1, -1)

    def _start_hires(self, x, hires: Hires, sizes, noise, prompts, negs, guidance, guidance_rescale, clip_skip,
                     spec, steps, prompt_syntax: bool = True):
        """The hires fix's second pass: (denoiser, x, sigmas, sampler spec) from the first pass's latents.

        As A1111: upscale (latents, or the decoded picture then encoded again), crop to the target, then an
        img2img run of exactly `hires.steps` steps (0: the first pass's count): the last of a schedule of
        steps / strength, so that strength is the fraction of the schedule the pass covers.
        """
        (uw, uh), (tw, th) = sizes
        f = self.vae.latent_factor
        if isinstance(hires.upscaler, str) and hires.upscaler in LATENT_MODES:
            x0 = upscale_latents(x, (uh // f, uw // f), hires.upscaler)
        else:
            pictures = [upscale_image(im, (uw, uh), hires.upscaler) for im in to_pil(self.decode(x))]
            x0 = torch.cat([self.encode(from_pil(p, (uw, uh), self.device, self.vae_dtype)) for p in pictures])
        top, left = (uh - th) // f // 2, (uw - tw) // f // 2
        x0 = x0[:, :, top:top + th // f, left:left + tw // f].contiguous()
        spec = spec if hires.sampler is None else get_sampler(hires.sampler)
        n = hires.steps or steps
        total = min(int(n / min(hires.strength, 0.999)), self.schedule.num_timesteps)
        sdxl = isinstance(self.text, DualTextEncoder)
        x, sigmas = self._noised(x0, spec.sigmas(self.schedule, total, sdxl=sdxl), self._hires_steps(hires, steps),
                                 noise)
        prompts = prompts if hires.prompt is None else [hires.prompt] * len(prompts)
        negs = negs if hires.negative_prompt is None else [hires.negative_prompt] * len(negs)
        denoiser = self.denoiser(prompts, negs, guidance, guidance_rescale, clip_skip, size=(th, tw), steps=n,
                                 prompt_syntax=prompt_syntax)
        if self.inpainting_model:
            denoiser.concat = self._unmasked_concat(x.shape)
        return denoiser, x, sigmas, spec

    def _hires_steps(self, hires: Hires, steps: int) -> int:
        """The sampler steps the second pass runs: hires.steps (0: the first pass's), within the schedule."""
        n = hires.steps or steps
        return min(n, int(n / min(hires.strength, 0.999)), self.schedule.num_timesteps)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents (float32) of pictures in [-1, 1] (the posterior mean), whole or in tiles as decode."""
        images = images.to(self.vae_dtype)
        f = self.vae.latent_factor
        tile = self.vae_tile(images.shape[-2], images.shape[-1], images.shape[0])
        if tile is None or images.shape[-2] % f or images.shape[-1] % f:
            return self.vae.encode(images).float()
        one = (lambda x: self.vae.encode(x)) if not tile else (lambda x: tiled_encode(self.vae, x, tile))
        return torch.cat([one(images[i:i + 1]).float() for i in range(images.shape[0])])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] (float32): the batch whole, or one by one, or in tiles, as the memory allows."""
        latents = latents.to(self.vae_dtype)
        f = self.vae.latent_factor
        tile = self.vae_tile(latents.shape[-2] * f, latents.shape[-1] * f, latents.shape[0])
        if tile is None:
            return self.vae.decode(latents).float()
        one = (lambda z: self.vae.decode(z)) if not tile else (lambda z: tiled_decode(self.vae, z, tile))
        return torch.cat([one(latents[i:i + 1]).float() for i in range(latents.shape[0])])
