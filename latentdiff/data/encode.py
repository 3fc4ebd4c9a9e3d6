"""encode-shards: image shards -> VAE latent shards, so the U-Net stage reads latents instead of encoding."""
from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from latentdiff.data.loader import IMAGE_EXTS, DataError, expand_shards
from latentdiff.io.images import load_image, to_tensor
from latentdiff.data.shards import write_tar


def encode_shards(src, out, checkpoint, resolution: int | None = None, batch_size: int = 32, device: str = "cpu",
                  hflip: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Encode every image once with the VAE (posterior mode, scaled) and write one latent shard per input shard.

    The mode (the posterior mean) is deterministic, so the latents are a fixed function of the image; the
    sampling noise of the KL posterior is small next to the diffusion noise added during training.
    """
    import webdataset as wds
    from tqdm import tqdm

    from latentdiff.io.checkpoint import CheckpointError, load_models

    urls = expand_shards(src)
    out = Path(out)
    targets = [out / os.path.basename(u) for u in urls]
    if len(set(targets)) != len(targets):
        raise DataError("input shards have repeated file names; encode each folder into its own --out")
    clash = [str(t) for t, u in zip(targets, urls) if os.path.exists(u) and t.exists() and t.samefile(u)]
    if clash:
        raise DataError(f"--out would overwrite the input shard {clash[0]}; choose another --out folder")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists ({len(existing)} output shard(s) do); pass --overwrite or another --out")

    try:
        models = load_models(str(checkpoint), torch.device(device), torch.float32)
    except (CheckpointError, FileNotFoundError) as e:
        raise DataError(f"cannot load --checkpoint {checkpoint}: {e}") from None
    except RuntimeError as e:  # torch.device("bogus")
        raise DataError(f"--device {device}: {str(e).splitlines()[0]}") from None
    try:  # made only now, so a refused run leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out {out}: {e.strerror or e}; choose another folder") from None
    vae = models.vae.eval()
    resolution = resolution or models.config.image_size
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    written = 0

    def on_error(exc):
        skipped[f"unreadable tar member ({type(exc).__name__})"] += 1
        return True

    @torch.no_grad()
    def encode(pixels):
        return vae.encode(pixels.to(device)).float().cpu().numpy()

    def encode_batch(images, records, done):
        pixels = torch.stack([to_tensor(img) for img in images])
        lat = encode(pixels)
        lat_flip = encode(pixels.flip(-1)) if hflip else None
        for i, (key, caption, meta) in enumerate(records):
            files = {"txt": caption, "latent.npy": _npy_bytes(lat[i])}
            if lat_flip is not None:
                files["latent_flip.npy"] = _npy_bytes(lat_flip[i])
            meta["latent"] = {"shape": list(lat[i].shape), "resolution": resolution, "posterior": "mode",
                              "scale_factor": models.config.vae.scale_factor, "checkpoint": Path(checkpoint).name}
            files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            done.append((key, files))

    # Shards are staged and moved into --out together at the end, so an interrupted run leaves no partial set.
    staging = out / f".tmp-encode-{os.getpid()}"
    staging.mkdir()
    try:
        for url, target in tqdm(list(zip(urls, targets)), desc="encode-shards", unit="shard", disable=not progress):
            done: list[tuple[str, dict[str, bytes]]] = []
            images, records = [], []
            for sample in wds.tarfile_samples([{"url": url}], handler=on_error):
                key = os.path.basename(sample["__key__"])
                try:
                    ext = next((e for e in IMAGE_EXTS if e in sample), None)
                    if ext is None:
                        raise KeyError("no image")
                    img = load_image(sample[ext], resolution)
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                    caption = sample["txt"]
                except Exception as e:
                    reason = f"undecodable sample ({type(e).__name__})"
                    skipped[reason] += 1
                    examples.setdefault(reason, f"{url}:{key}")
                    continue
                images.append(img)
                records.append((key, caption, meta))
                if len(images) == batch_size:
                    encode_batch(images, records, done)
                    images, records = [], []
            if images:
                encode_batch(images, records, done)
            write_tar(staging / target.name, done)
            written += len(done)
        for target in targets:
            os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"written": written, "shards": [str(t) for t in targets], "skipped": dict(skipped), "examples": examples}


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()
