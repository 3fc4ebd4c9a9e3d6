"""The checkpoints a server may load, its jobs, and the one worker thread that owns the device: it runs a queue of
jobs in arrival order and merges compatible waiting txt2img requests into one U-Net batch."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from latentdiff.cli import UsageError, output_paths, slug
from latentdiff.io.files import file_sha256, model_name
from latentdiff.serve.a1111 import ApiError, answer_info, infotext, png_base64, resolve_sampler, sampler_string

log = logging.getLogger("latentdiff.serve")
WORKER_DEAD = "The server's worker stopped after an internal error; see the server log and restart the server"


@dataclass(frozen=True)
class ServeConfig:
    """Limits checked before any work, and the queue's behaviour (a `serve:` section in a YAML file)."""
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 1024 * 1024  # width * height
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter of one request
    max_queue: int = 32  # requests waiting behind the running one; more get 503 at once
    merge_images: int = 8  # waiting txt2img requests are merged into one U-Net batch of up to this many images
    max_body_mb: float = 50.0  # request bodies carry base64 images
    max_prompt_chars: int = 10000  # per prompt, a bound on the tokenizer's work; the real limit is the next
    max_prompt_chunks: int = 20  # chunks per prompt, as the encoder cuts it (at most 75 tokens each, a BREAK starts
    # one): each adds 77 tokens of context to attend to
    live_preview: bool = True  # /progress may return the predicted x0 of the first image


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A model file the server may load; clients see its title and name, never its folder."""
    path: Path
    sha256: str

    @property
    def model_name(self) -> str:
        return model_name(self.path)  # training checkpoints by run and step, not all "model"

    @property
    def hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.hash}]"

    def names(self) -> set[str]:
        """Every name a client may select it by (A1111's aliases)."""
        return {self.title, self.model_name, self.path.name, self.hash, self.sha256}

    def item(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.path.name, "config": None}


def find_checkpoints(paths: list[str]) -> list[Checkpoint]:
    """Files given on the command line (folders: their .safetensors / .ckpt files), or the bundled model."""
    from latentdiff.io.checkpoint import BUNDLED  # there, not here: io.checkpoint loads torch
    files: list[Path] = []
    for p in paths or []:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".ckpt"))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"checkpoint {p} not found; pass an existing .safetensors or .ckpt file or a folder of them")
    if not paths:
        if not BUNDLED.exists():
            raise UsageError("no model to serve: this version has no bundled model; pass --checkpoint FILE "
                             "(an SD 1.x / 2.x or latentdiff checkpoint)")
        files = [BUNDLED]
    if not files:
        raise UsageError(f"no .safetensors or .ckpt files in {', '.join(paths)}; pass --checkpoint FILE")
    return [Checkpoint(f.resolve(), file_sha256(f)) for f in files]


# ----------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Job:
    """One request, resolved: everything the worker needs, per image where it may differ."""
    checkpoint: Checkpoint
    prompts: list[str]  # one per image
    negatives: list[str]
    seeds: list[int]
    steps: int
    sampler: str  # A1111 title
    kind: str  # sigma schedule
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    clip_skip: int | None = None
    init_image: Image.Image | None = None
    strength: float | None = None
    mask: Image.Image | None = None  # inpainting, with its io.masks.InpaintOptions
    inpaint: object = None
    hires: object = None  # pipeline.Hires: the hires fix (txt2img)
    save: bool = False
    send: bool = True
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the answer's info (a size far from the model's)
    loras: tuple = ()  # the <lora:NAME:...> tags of its prompt, (name, unet, te) sorted: one adapter set per U-Net batch
    lora_hashes: str | None = None  # A1111's `Lora hashes` infotext value
    chunks: int = 1  # chunks of the context its prompts are encoded into (the longest one's; prompt_chunks)
    hires_chunks: int = 0  # those of the hires pass's context (0: no hires fix)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    def key(self):
        """Jobs with equal keys can share one U-Net batch; img2img and multi-iteration jobs run alone."""
        if self.init_image is not None or len(self.seeds) > self.batch_size:
            return None
        # The chunk counts too, of both passes: a batch encodes every prompt to its longest one's chunks, and the
        # empty chunks a short prompt would be padded with change its image.
        return (self.checkpoint.sha256, self.steps, self.sampler, self.kind, self.cfg_scale, self.width,
                self.height, self.clip_skip, self.chunks, self.hires_chunks, self.loras, self.hires)


def prompt_chunks(encoder, prompt: str, negative: str, steps: int, guidance: float, hires,
                  limit: int) -> tuple[int, int, list[str]]:
    """(chunks of the first pass's context, of the hires pass's or 0, problems) for a job's texts as the pipeline
    encodes them, each counted by models.prompts.count_chunks: the prompt without its <lora:...> tags and the
    negative prompt (with guidance only) over `steps`; the hires pass's own texts (the first pass's where it has
    none) over its steps. A problem names every text over `limit` chunks, the negative prompt included."""
    from latentdiff.io.adapters import AdapterError, extract_loras
    from latentdiff.models.prompts import count_chunks
    try:
        prompt = extract_loras(prompt)[0]  # as LoraSet.activate gives the pipeline its texts
    except AdapterError:
        pass  # refused for its tags (app.prompt_loras)
    counts = {"prompt": count_chunks(encoder, prompt, steps), "negative_prompt": count_chunks(encoder, negative, steps)}
    guided = guidance != 1.0
    first, second = max(counts["prompt"], counts["negative_prompt"] if guided else 1), 0
    if hires is not None:
        n = hires.steps or steps
        hr = []
        pairs = [("prompt", hires.prompt, prompt), ("negative_prompt", hires.negative_prompt, negative)]
        for field, own, text in pairs:
            if own is None and n == steps:  # the first pass's text over the same steps: counted above
                hr.append(counts[field])
            else:
                hr.append(count_chunks(encoder, text if own is None else own, n))
                counts[f"hr_{field}" if own is not None else f"{field} (hires pass)"] = hr[-1]
        second = max(hr[0], hr[1] if guided else 1)
    per = encoder.config.context_length - 2
    over = ", ".join(f"{k} chunks in {field}" for field, k in counts.items() if k > limit)
    problems = [f"prompts may have at most {limit * per} tokens ({limit} chunks of {per}); got {over} (a BREAK "
                f"starts a new chunk)"] if over else []
    return first, second, problems


@dataclass
class Task:
    """A function to run on the worker in turn with the jobs (a model switch)."""
    fn: Callable
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


def settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None):
    """Answer a future unless its client already went away (a cancelled future cannot take an answer)."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


def text_layers(config) -> int:
    """How many layers CLIP skip may count back through: the text encoder's (SDXL: the smaller of its two)."""
    return min(c.layers for c in (config.text, config.text2) if c is not None)


@dataclass
class Progress:
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    time_start: float = 0.0
    job_timestamp: str = "0"
    preview: str | None = None


# ----------------------------------------------------------------------------------------------
# The worker


class Worker:
    """The queue and the one thread that uses the device: jobs run in arrival order, merged when compatible."""

    def __init__(self, checkpoints: list[Checkpoint], config: ServeConfig, device="auto", dtype=None,
                 outdir: str | None = None):
        self.checkpoints, self.config, self.device, self.dtype = checkpoints, config, device, dtype
        self.outdir = os.path.join(str(outdir), "") if outdir else None  # always a folder, even one named x.png
        self.selected = checkpoints[0]
        self.clip_skip = 1  # A1111's CLIP_stop_at_last_layers: 1 is the model's own layer
        self.live_preview = config.live_preview
        self.pipe = None
        self.loaded: Checkpoint | None = None
        self.model_defaults: dict[str, dict] = {}  # per checkpoint sha256, read when it is first loaded
        self.prompt_encoders: dict[str, object] = {}  # per checkpoint sha256: prompt_encoder
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.cond = threading.Condition()
        self.progress = Progress()
        self.stop = threading.Event()
        self.want_preview = threading.Event()
        self.closed = False
        self.batches = collections.deque(maxlen=1000)  # images per U-Net batch, latest last (tests, benchmarks)
        self.lora_dirs: list[Path] = []  # where <lora:NAME> is found (--lora-dir); listed by refresh_loras
        self.embeddings_dirs: list[Path] = []  # textual inversion (--embeddings-dir), read when a model loads
        self.lora_files: dict[str, Path] = {}
        self._hashes: dict[tuple, str] = {}
        self.upscaler_files: dict[str, Path] = {}  # hires fix networks (--upscaler-dir), by file stem
        self._upscalers: dict[str, object] = {}  # those loaded (io.upscalers.load_upscaler), kept for the next job
        self.thread = threading.Thread(target=self._loop, name="latentdiff-worker", daemon=True)

    def start(self):
        self.load(self.selected)  # at start-up, so a bad model fails before the server listens
        self.thread.start()

    def close(self):
        with self.cond:
            self.closed = True
            self.stop.set()  # a running job ends at its next step
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def find(self, name: str) -> Checkpoint:
        for c in self.checkpoints:
            if name in c.names():
                return c
        raise ApiError(404, f"Model not found: {name!r}; GET /sdapi/v1/sd-models lists the titles")

    def load(self, ckpt: Checkpoint):
        """Make ckpt the model in memory (one at a time: the old one is freed first)."""
        if self.loaded == ckpt:
            return
        from latentdiff.io.checkpoint import CheckpointError
        from latentdiff.pipeline import Pipeline
        import torch
        self.pipe, self.loaded = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.pipe = Pipeline.from_checkpoint(ckpt.path, device=self.device, dtype=self.dtype)
        except CheckpointError as e:
            log.error("cannot load %s: %s", ckpt.path, e)
            raise ApiError(500, f"Model {ckpt.title} cannot be loaded; see the server log") from None
        self.loaded = ckpt
        self.pipe.loras.dirs = list(self.lora_dirs)
        self.load_embeddings()
        c = self.pipe.config
        title, kind = resolve_sampler(c.sampling.sampler, None, c.sampling.sampler)
        self.model_defaults[ckpt.sha256] = {
            "steps": c.sampling.steps, "cfg_scale": c.sampling.guidance, "width": c.image_size,
            "height": c.image_size, "sampler_name": title, "scheduler": kind,
            "sampler": c.sampling.sampler, "size_multiple": self.pipe.size_multiple,
            "clip_layers": text_layers(c)}

    def find_upscalers(self, folders: list[Path]) -> None:
        """The hires fix's networks: the .pth / .safetensors files of these folders, by stem (A1111's names)."""
        from latentdiff.io.upscalers import SUFFIXES
        self.upscaler_files = {f.stem: f for d in folders for f in sorted(Path(d).iterdir()) if f.suffix in SUFFIXES}

    def upscaler(self, name: str):
        """A hires fix upscaler by name: a built-in one's name, or the network file of that stem, loaded once."""
        from latentdiff.io.upscalers import UpscalerError, load_upscaler
        from latentdiff.models.upscalers import BUILT_IN
        if name in BUILT_IN:
            return name
        if name not in self.upscaler_files:
            raise ApiError(422, f"hr_upscaler {name!r} not found: GET /sdapi/v1/upscalers and "
                                f"/sdapi/v1/latent-upscale-modes list the names")
        if name not in self._upscalers:
            import torch
            from latentdiff.pipeline import pick_device
            device = pick_device(self.device)
            try:
                self._upscalers[name] = load_upscaler(self.upscaler_files[name], device,
                                                      torch.float16 if device.type == "cuda" else torch.float32)
            except UpscalerError as e:
                log.error("%s", e)
                raise ApiError(422, f"hr_upscaler {name!r} cannot be loaded; see the server log") from None
        return self._upscalers[name]

    def refresh_loras(self) -> dict[str, Path]:
        """List the LoRA folders again (A1111's refresh-loras): {name: file}."""
        from latentdiff.io.adapters import list_adapters
        self.lora_files = list_adapters(self.lora_dirs)
        return self.lora_files

    def lora_hash(self, name: str) -> str:
        """A1111's short hash of a listed LoRA, hashed once per version of the file."""
        from latentdiff.io.adapters import short_hash
        path = self.lora_files[name]
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = short_hash(path)
        return self._hashes[key]

    def load_embeddings(self):
        """Give the loaded model the embeddings in the folders (on the worker thread, or before it starts)."""
        import warnings
        import torch
        from latentdiff.models.text_encoder import TextEncoder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.pipe.set_embeddings_dirs(self.embeddings_dirs)
        for w in caught:
            log.warning("%s", w.message)
        text = getattr(self.pipe.text, "clip_l", self.pipe.text)  # SDXL's two encoders cut prompts alike
        with torch.device("meta"):  # the tokenizer with the embeddings' token ids, no weights
            twin = TextEncoder(text.config)
        twin.set_embeddings({name: v.to("meta") for name, v in text.embeddings.items()})
        self.prompt_encoders[self.loaded.sha256] = twin  # replaced whole: request threads read it unlocked

    def prompt_encoder(self, ckpt: Checkpoint):
        """What requests count prompt chunks with (prompt_chunks), off the worker thread: a weightless copy of
        ckpt's text encoder with its embeddings, or of the first model loaded for one not loaded yet (the worker
        counts again once it is)."""
        return self.prompt_encoders.get(ckpt.sha256) or next(iter(self.prompt_encoders.values()))

    def public(self, message: str) -> str:
        """An adapter error for a client: the server's folders taken out (no answer carries paths)."""
        for folder in self.lora_dirs:
            message = message.replace(str(Path(folder).resolve()) + os.sep, "").replace(str(folder) + os.sep, "")
        return message

    def defaults(self, ckpt: Checkpoint | None = None) -> dict:
        """What a request that leaves a field out gets: the model's own settings (those of the first model
        loaded, for one not loaded yet; the worker checks the size again once it is)."""
        ckpt = ckpt or self.selected
        return self.model_defaults.get(ckpt.sha256) or next(iter(self.model_defaults.values()))

    def submit(self, job) -> concurrent.futures.Future:
        """Queue a job; a full queue is refused at once (503) rather than left to pile up."""
        with self.cond:
            if self.closed:
                raise ApiError(503, "Server is shutting down")
            if self.dead:
                raise ApiError(503, WORKER_DEAD)
            if len(self.waiting) >= self.config.max_queue:
                raise ApiError(503, f"Queue is full ({self.config.max_queue} requests waiting); try again later")
            self.waiting.append(job)
            self.cond.notify()
        return job.future

    def interrupt(self):
        with self.cond:
            if self.running:
                self.stop.set()
                self.progress.interrupted = True

    def queued(self) -> int:
        with self.cond:
            return len(self.waiting)

    @property
    def dead(self) -> bool:
        """The worker thread ended without being closed (a bug): nothing queued would ever run."""
        return self.thread.ident is not None and not self.thread.is_alive() and not self.closed

    # The worker thread -------------------------------------------------------------------------

    def _loop(self):
        try:
            while (group := self._take()) is not None:
                self._run_group(group)
        finally:  # closed, or an error no job caught: no request may be left waiting on a thread that is gone
            with self.cond:
                stranded, self.running, self.waiting = self.running + list(self.waiting), [], collections.deque()
            for job in stranded:
                settle(job.future, error=ApiError(503, "Server is shutting down" if self.closed else WORKER_DEAD))
            if not self.closed:
                log.error("the worker thread stopped; every request now answers 503 until the server is restarted")

    def _take(self) -> list | None:
        """Wait for work; return the next job with the waiting ones that can share its batch (or a Task alone),
        now running. None once closed: whatever still waits is answered 503."""
        with self.cond:
            while True:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return None  # _loop answers whatever still waits
                head = self.waiting.popleft()
                # Marked running, so that its client can no longer cancel it; False: it was cancelled while waiting
                # (the client went away) and is dropped.
                if head.future.set_running_or_notify_cancel():
                    break
            group = [head]
            key = head.key() if isinstance(head, Job) else None
            if key is not None:
                n = len(head.seeds)
                for job in list(self.waiting):
                    if isinstance(job, Job) and job.key() == key and n + len(job.seeds) <= self.config.merge_images:
                        self.waiting.remove(job)
                        if job.future.set_running_or_notify_cancel():
                            group.append(job)
                            n += len(job.seeds)
            self.running = group
            self.stop.clear()
            return group

    def _run_group(self, group: list):
        """Run a group from _take and answer each of its futures (with its result, or the group's error)."""
        results, error = None, None
        try:
            results = [group[0].fn()] if isinstance(group[0], Task) else self._run(group)
        except Exception as e:  # noqa: BLE001 - every error goes back to the requests that caused it
            error = e
            if not isinstance(e, ApiError):
                log.exception("job failed")
        with self.cond:  # idle again before anyone hears back, so a client's next /progress already says so
            self.running = []
            self.progress = Progress()
        for i, job in enumerate(group):
            settle(job.future, None if error is not None else results[i], error)

    def _run(self, group: list[Job]) -> list[dict]:
        """Run merged jobs (or one job's n_iter iterations) through the pipeline; returns one answer per job."""
        import torch
        head = group[0]
        self.load(head.checkpoint)
        pipe = self.pipe
        for job in group:
            self._check(pipe, job)
        if len({(job.chunks, job.hires_chunks) for job in group}) > 1:  # counted with another model's embeddings
            return [answer for job in group for answer in self._run([job])]
        chunks = self._chunks(group)
        prompts = [p for j in group for p in j.prompts]
        from latentdiff.io.adapters import AdapterError
        try:  # the group's one adapter set, applied now: a file that does not fit this model is the client's 422
            pipe.loras.activate(prompts)
        except AdapterError as e:
            raise ApiError(422, self.public(str(e))) from None
        negatives = [n for j in group for n in j.negatives]
        seeds = [s for j in group for s in j.seeds]
        stamp = time.strftime("%Y%m%d%H%M%S")
        with self.cond:
            self.progress = Progress(job="txt2img" if head.init_image is None else "img2img",
                                     job_count=len(chunks), time_start=time.time(), job_timestamp=stamp,
                                     sampling_steps=head.steps)
        images, interrupted = [], False
        for no, (a, b) in enumerate(chunks):
            with self.cond:
                self.progress.job_no, self.progress.sampling_step = no, 0
            if self.stop.is_set():
                interrupted = True
                break
            self.batches.append(b - a)
            gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[a:b]]
            img2img = {"init_image": head.init_image, "strength": head.strength} if head.init_image is not None else {}
            img2img.update(mask=head.mask, inpaint=head.inpaint, hires=head.hires)
            result = pipe(prompts[a:b], negatives[a:b], num_images=1, seed=seeds[a], generators=gens,
                          steps=head.steps, sampler=sampler_string(head.sampler, head.kind), guidance=head.cfg_scale,
                          height=head.height, width=head.width, clip_skip=head.clip_skip,
                          callback=self._step_callback(pipe), progress=False, **img2img)
            images += result.images  # interrupted, as A1111: the images as far as they got (the running ones' x0)
            head.warnings += [n for n in result.notes if n not in head.warnings]  # a mask resized to the picture
            if result.interrupted:
                interrupted = True
                break
        answers, k = [], 0
        for job in group:
            n = min(len(job.seeds), max(0, len(images) - k))
            answers.append(self._answer(job, images[k:k + n], interrupted, stamp))
            k += len(job.seeds)
        return answers

    def _check(self, pipe, head: Job):
        """The request again, against the model now loaded (it was checked against the one loaded then), its
        chunks counted again with this model's embeddings."""
        layers = text_layers(pipe.config)
        if head.clip_skip is not None and head.clip_skip > layers:
            raise ApiError(422, f"CLIP_stop_at_last_layers must be in 1..{layers} for {head.checkpoint.title} "
                                f"(got {head.clip_skip})")
        text = getattr(pipe.text, "clip_l", pipe.text)
        head.chunks, head.hires_chunks, problems = prompt_chunks(
            text, head.prompts[0], head.negatives[0], head.steps, head.cfg_scale, head.hires,
            self.config.max_prompt_chunks)
        if problems:
            raise ApiError(422, problems[0])
        per = text.config.context_length  # tokens of context per chunk
        try:
            pipe.check(steps=head.steps, height=head.height, width=head.width, guidance=head.cfg_scale,
                       strength=head.strength, tokens=head.chunks * per)
            pipe.hires_sizes(head.hires, head.width, head.height, head.init_image, head.steps, head.cfg_scale,
                             head.hires_chunks * per)
        except ValueError as e:
            raise ApiError(422, str(e)) from None

    @staticmethod
    def _chunks(group: list[Job]) -> list[tuple[int, int]]:
        """The U-Net batches, as (start, end) into the group's images: all of them at once for merged jobs;
        A1111's n_iter for a job alone (batches of batch_size, one after another)."""
        head = group[0]
        if len(group) == 1:
            return [(i, i + head.batch_size) for i in range(0, len(head.seeds), head.batch_size)]
        return [(0, sum(len(j.seeds) for j in group))]

    def _step_callback(self, pipe) -> Callable:
        """The pipeline's per-step callback: progress, a live preview when one was asked for, and interrupts."""
        from latentdiff.io.images import to_pil
        from latentdiff.pipeline import Interrupted

        def on_step(info):
            part, parts = info["part"]  # the pipeline's own batches (a batch too large for the device is split)
            with self.cond:  # over all of them, so progress never goes back; img2img runs fewer steps than asked
                self.progress.sampling_steps = info["steps"] * parts
                self.progress.sampling_step = part * info["steps"] + info["i"] + 1
            if self.live_preview and self.want_preview.is_set():
                self.want_preview.clear()
                preview = png_base64(to_pil(pipe.decode(info["denoised"][:1]))[0])
                with self.cond:
                    self.progress.preview = preview
            if self.stop.is_set():
                raise Interrupted
        return on_step

    def _answer(self, job: Job, images: list, interrupted: bool, stamp: str) -> dict:
        """Images as base64 PNGs with their infotext, and A1111's `info` fields."""
        infotexts = [infotext(job, i) for i, _ in enumerate(images)]
        if job.save and self.outdir:
            from latentdiff.io.images import save_image
            names = [f"{slug(job.prompts[i])}-{job.seeds[i]}" for i in range(len(images))]
            for path, im, text in zip(output_paths(self.outdir, names), images, infotexts):
                save_image(im, path, text)
        encoded = [png_base64(im, t) for im, t in zip(images, infotexts)] if job.send else []
        return {"images": encoded, "info": answer_info(job, infotexts, interrupted, stamp)}
