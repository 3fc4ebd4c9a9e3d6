"""Builds latentdiff and its kernels, latentdiff._C: C++ always, CUDA when a toolkit and a CUDA torch are present.

Install torch first, then `pip install --no-build-isolation .` so the extension builds against that torch.
LATENTDIFF_NO_EXT=1 skips the extension (the PyTorch path still works); LATENTDIFF_NO_CUDA=1 builds C++ only.
"""
import glob
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(here, "latentdiff", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in latentdiff/__init__.py")


def find_cuda_home():
    """Set CUDA_HOME before torch reads it: torch derives it from `which nvcc`, which is wrong when nvcc on the
    PATH is a wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one gives /usr/local)."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def extensions():
    if os.environ.get("LATENTDIFF_NO_EXT") == "1":
        return [], {}
    find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("latentdiff: torch is not installed, so the kernels are not built; install torch first, then "
              "pip install --no-build-isolation .")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("LATENTDIFF_NO_CUDA") != "1")
    if use_cuda and not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        print(f"latentdiff: CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h, so only the C++ kernels are built; "
              "set CUDA_HOME to the CUDA toolkit to build the CUDA kernels too")
        use_cuda = False
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the architecture from: Ampere and Hopper machine code, plus PTX that newer GPUs can JIT.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        print("latentdiff: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX")
    if os.name == "nt":
        cxx = ["/O2", "/std:c++20", "/openmp"]
    else:  # -Wno-unknown-pragmas: the ATen vector headers use `#pragma unroll`, which GCC does not know
        cxx = ["-O3", "-std=c++20", "-Wno-unknown-pragmas", "-fopenmp"]
    # py_limited_api=True makes BuildExtension define Py_LIMITED_API (torch's minimum CPython), so one wheel serves
    # every CPython from there on: the module has no Python API besides its init. Torch >= 2.10 headers need C++20.
    macros = []
    if use_cuda:
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension("latentdiff._C", sources + cuda_sources, define_macros=macros + [("LATENTDIFF_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
                            py_limited_api=True)
    else:
        ext = CppExtension("latentdiff._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"], py_limited_api=True)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="latentdiff",
    version=read_version(),
    description="Latent text-to-image diffusion in the Stable Diffusion layout, with fused C++/CUDA kernels",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[*find_packages(include=["latentdiff", "latentdiff.*"]), "latentdiff.configs"],
    package_dir={"latentdiff.configs": "configs"},
    package_data={"latentdiff": ["weights/*.safetensors"], "latentdiff.serve": ["static/*"],
                  "latentdiff.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    install_requires=["torch>=2.4", "open_clip_torch>=2.26.1", "ninja", "pybind11", "webdataset>=0.2.80", "einops",
                      "safetensors>=0.4", "pillow", "tqdm", "pyyaml",
                      "fastapi>=0.165", "uvicorn>=0.23"],  # python -m latentdiff.serve (the fastapi tested)
    extras_require={"data": ["emoji>=2.10"],  # emoji aliases for `python -m latentdiff.data emoji`
                    "upscalers": ["spandrel>=0.4"],  # ESRGAN-family files for the hires fix's --hires-upscaler
                    "test": ["pytest", "diffusers>=0.30", "transformers>=4.40", "emoji>=2.10",
                             "requests", "webuiapi>=0.9", "selenium>=4.10",  # serve: A1111's client, the page
                             "import-linter>=2.1",  # the layers contract in pyproject.toml
                             "peft>=0.10", "lycoris-lora>=3.0",  # LoRA parity: diffusers' loader, LyCORIS' maths
                             # samplers against k-diffusion's sampling.py: its own needs (k-diffusion itself is
                             # installed with --no-deps, see the README's test command: its dctorch pins numpy<2),
                             # and lark for A1111's prompt grammar
                             "torchsde>=0.2.5", "torchdiffeq>=0.2", "scipy>=1.8", "lark>=1.1",
                             "spandrel>=0.4"]},  # hires fix: a super-resolution file read as users' are
    entry_points={"console_scripts": ["latentdiff-generate=latentdiff.generate:main",
                                      "latentdiff-serve=latentdiff.serve.__main__:main"]},
)
