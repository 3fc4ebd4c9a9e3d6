"""The pipeline's CUDA-graph U-Net (GPU only): the same outputs as the eager U-Net, one graph per input shape."""
import pytest
import torch

from latentdiff.pipeline import GraphedUNet, Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_graphed_pipeline_matches_eager(tiny_checkpoint, dtype):
    graphed = Pipeline.from_checkpoint(tiny_checkpoint, device="cuda", dtype=dtype)
    eager = Pipeline.from_checkpoint(tiny_checkpoint, device="cuda", dtype=dtype, cuda_graphs=False)
    assert isinstance(graphed.unet_call, GraphedUNet) and not isinstance(eager.unet_call, GraphedUNet)
    for size, n in ((64, 1), (64, 3), (128, 1)):  # three input shapes: three graphs, each replayed every step
        a = graphed(["a cat"], steps=4, seed=5, width=size, height=size, num_images=n, return_latents=True,
                    progress=False)
        b = eager(["a cat"], steps=4, seed=5, width=size, height=size, num_images=n, return_latents=True,
                  progress=False)
        torch.testing.assert_close(a.latents, b.latents)  # the same kernels replayed: float32 latents agree
    assert len(graphed.unet_call.graphs) == 3 and not graphed.unet_call.failed


def test_graph_outputs_survive_the_next_replay(tiny_checkpoint):
    """Each call returns its own tensor: a later replay (Heun's second evaluation) must not overwrite it."""
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cuda", dtype="fp32")
    x = torch.randn(2, 4, 8, 8, device="cuda")
    ctx = torch.randn(2, 77, pipe.config.unet.context_dim, device="cuda")
    t = torch.full((2,), 500.0, device="cuda")
    with torch.no_grad():
        first = pipe.unet_call(x, t, ctx)
        keep = first.clone()
        pipe.unet_call(x * 2, t, ctx)
        torch.testing.assert_close(first, keep, rtol=0, atol=0)
        torch.testing.assert_close(first, pipe.unet(x, t, ctx), rtol=1e-5, atol=1e-5)


def test_graph_cache_stays_within_its_budget_and_gives_pools_back(tiny_checkpoint):
    """With room for one graph, each new shape evicts the last one: the answers stay the eager U-Net's, and the
    evicted pools go back to the device rather than piling up (tests/test_graphed_unet.py checks the policy)."""
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cuda", dtype="fp16")
    graphed = pipe.unet_call
    ctx = pipe.encode_prompts(["a cat"], [""]).half()  # (2, 77, D), as the denoiser passes it

    def inputs(size):
        g = torch.Generator("cuda").manual_seed(size)
        return (torch.randn(2, 4, size, size, device="cuda", generator=g).half(),
                torch.full((2,), 500.0, device="cuda"), ctx)

    with torch.no_grad():
        graphed(*inputs(8))
        graphed.budget = graphed.pool_bytes  # room for one graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # cached eager blocks out of the count: what stays reserved is weights and pools
        reserved, biggest = torch.cuda.memory_reserved(), 0
        for size in (16, 24, 8, 16, 24, 8):
            out = graphed(*inputs(size))
            biggest = max(biggest, graphed.pool_bytes)
            torch.testing.assert_close(out, pipe.unet(*inputs(size)))
            assert len(graphed.graphs) == 1 and not graphed.failed
        torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= reserved + biggest  # six captures of three shapes: one pool kept
