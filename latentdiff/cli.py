"""What the commands share: an argument parser whose errors are one line, usage errors, output file names, and
the argument checks more than one command makes."""
from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from pathlib import Path


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block above them), exit code 2; every command uses it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "image"


def check_sampler_and_guidance(sampler: str | None, guidance: float | None):
    """--sampler and --guidance of generate and evaluate (None: the model's), as one-line usage errors."""
    from latentdiff.diffusion.samplers import get_sampler
    if sampler is not None:
        try:
            get_sampler(sampler)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if guidance is not None and not math.isfinite(guidance):
        raise UsageError(f"--guidance must be a finite number (got {guidance})")
    if guidance is not None and guidance < 0:
        raise UsageError(f"--guidance must be at least 0 (got {guidance}); 1 is the prompt alone, no guidance, "
                         f"and 0 the unconditional model")


def output_paths(output: str | None, names: list[str]) -> list[Path]:
    """One path per image: -o x.png (x-0.png, x-1.png ... for several), -o DIR, or outputs/ named by prompt and seed."""
    if output and output.lower().endswith(".png"):
        base = Path(output)
        folder = base.parent
        paths = [base] if len(names) == 1 else [folder / f"{base.stem}-{i}.png" for i in range(len(names))]
    else:
        folder = Path(output or "outputs")
        paths = []
        for name in names:
            path, k = folder / f"{name}.png", 1
            while path.exists() or path in paths:
                path, k = folder / f"{name}-{k}.png", k + 1
            paths.append(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".latentdiff-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write to output folder {folder}: {e.strerror or e}; choose another with -o") from None
    return paths
