"""GraphedUNet's policy on the CPU, with a fake capture in place of CUDA's: one graph per input shape and dtype, its
output cloned, eager after a failed capture, a shape alone eager after an out-of-memory capture, and an LRU cache of
graphs within a byte budget whose pools the pipeline counts as taken. tests/test_cuda_graphs.py runs real graphs."""
import warnings

import pytest
import torch

from latentdiff.pipeline import GraphedUNet, Pipeline


def net(x, t, ctx):
    """A stand-in U-Net: any function of all three inputs does (the policy never looks inside)."""
    return x * 2 + t[:, None, None, None] + ctx.mean(dim=(1, 2))[:, None, None, None]


class FakeGraph:
    """What a CUDA graph does, on the CPU: a replay runs the recorded function on the graph's own input tensors and
    writes the graph's own output tensor."""

    def __init__(self, fn, inputs, output):
        self.fn, self.inputs, self.output, self.replays = fn, inputs, output, 0

    def replay(self):
        self.output.copy_(self.fn(*self.inputs))
        self.replays += 1


class FakeCuda:
    """capture() and release() for GraphedUNet, counting calls; `pool(args)` is each graph's pool size, `fail(args)`
    an exception to raise instead of capturing (or None)."""

    def __init__(self, pool=lambda args: 100, fail=lambda args: None):
        self.pool, self.fail, self.captured, self.releases, self.graphs = pool, fail, [], 0, []

    def capture(self, args):
        error = self.fail(args)
        if error is not None:
            raise error
        inputs = [a.clone() for a in args]
        graph = FakeGraph(net, inputs, net(*inputs))
        self.captured.append(tuple(a.shape for a in args))
        self.graphs.append(graph)
        return inputs, graph.output, graph, self.pool(args)

    def release(self):
        self.releases += 1


def inputs(batch=2, size=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g, dtype=dtype), torch.full((batch,), 500.0, dtype=dtype),
            torch.randn(batch, 77, 8, generator=g, dtype=dtype))


def graphed(cuda: FakeCuda, **kw) -> GraphedUNet:
    return GraphedUNet(net, capture=cuda.capture, release=cuda.release, **kw)


@torch.no_grad()
def test_one_graph_per_shape_and_dtype_replayed_with_the_eager_result():
    cuda = FakeCuda()
    g = graphed(cuda, budget=10_000)
    calls = [inputs(2, 4), inputs(2, 4, seed=1), inputs(1, 4), inputs(2, 8), inputs(2, 4, seed=2),
             inputs(2, 4, dtype=torch.float64), inputs(1, 4, seed=3)]
    for args in calls:
        torch.testing.assert_close(g(*args), net(*args), rtol=0, atol=0)
    # (2, 4) fp32, (1, 4), (2, 8), (2, 4) fp64: four graphs, the repeated shapes replayed rather than captured again
    assert cuda.captured == [((2, 4, 4, 4), (2,), (2, 77, 8)), ((1, 4, 4, 4), (1,), (1, 77, 8)),
                             ((2, 4, 8, 8), (2,), (2, 77, 8)), ((2, 4, 4, 4), (2,), (2, 77, 8))]
    assert [graph.replays for graph in cuda.graphs] == [3, 2, 1, 1] and len(g.graphs) == 4
    assert g.pool_bytes == 400 and cuda.releases == 0 and not g.failed


@torch.no_grad()
def test_each_call_returns_its_own_tensor():
    """A later replay (Heun's second evaluation) overwrites the graph's output: what a call returned must not move."""
    g = graphed(FakeCuda(), budget=10_000)
    first_args, second_args = inputs(seed=1), inputs(seed=2)
    first = g(*first_args)
    keep = first.clone()
    second = g(*second_args)
    torch.testing.assert_close(first, keep, rtol=0, atol=0)
    torch.testing.assert_close(second, net(*second_args), rtol=0, atol=0)
    first.add_(1.0)  # and writing into it does not reach the graph
    torch.testing.assert_close(g(*second_args), net(*second_args), rtol=0, atol=0)


@torch.no_grad()
def test_a_capture_that_fails_turns_graphs_off_with_one_warning():
    cuda = FakeCuda(fail=lambda args: RuntimeError("operation not permitted when stream is capturing")
                    if args[0].shape[-1] == 8 else None)
    g = graphed(cuda, budget=10_000)
    g(*inputs(2, 4))
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*operation not permitted"):
        out = g(*inputs(2, 8))
    torch.testing.assert_close(out, net(*inputs(2, 8)), rtol=0, atol=0)
    assert g.failed and not g.graphs and g.pool_bytes == 0 and cuda.releases == 1  # the kept graph's pool freed too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no capture tried again
        for args in (inputs(2, 4), inputs(3, 4), inputs(2, 8)):
            torch.testing.assert_close(g(*args), net(*args), rtol=0, atol=0)
    assert len(cuda.captured) == 1


@pytest.mark.parametrize("oom", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
])
@torch.no_grad()
def test_a_shape_without_memory_for_its_graph_runs_eagerly_alone(oom):
    big = lambda args: oom if args[0].shape[0] == 8 else None  # noqa: E731
    cuda = FakeCuda(fail=big)
    g = graphed(cuda, budget=10_000)
    g(*inputs(2, 4))
    with pytest.warns(UserWarning, match=r"no memory for a CUDA graph of input shapes \[\(8, 4, 4, 4\)"):
        out = g(*inputs(8, 4))
    torch.testing.assert_close(out, net(*inputs(8, 4)), rtol=0, atol=0)
    assert not g.failed and cuda.releases == 1  # what the failed capture reserved goes back
    for args in (inputs(8, 4, seed=1), inputs(2, 4, seed=1), inputs(1, 4)):  # 8 eager, not tried again; others graphed
        torch.testing.assert_close(g(*args), net(*args), rtol=0, atol=0)
    assert [c[0][0] for c in cuda.captured] == [2, 1] and cuda.graphs[0].replays == 2


@torch.no_grad()
def test_an_out_of_memory_error_raised_while_ending_a_capture_is_still_per_shape():
    """torch.cuda.graph's exit ends the capture even after an error, and that raises its own error."""
    def fail(args):
        error = RuntimeError("CUDA error: operation failed due to a previous error during capture")
        error.__context__ = torch.cuda.OutOfMemoryError("CUDA out of memory")  # as when raised inside its handler
        return error
    g = graphed(FakeCuda(fail=fail), budget=10_000)
    with pytest.warns(UserWarning, match="no memory for a CUDA graph"):
        g(*inputs())
    assert not g.failed and len(g.eager_shapes) == 1


@torch.no_grad()
def test_graphs_are_kept_least_recently_used_first_within_the_budget():
    cuda = FakeCuda(pool=lambda args: 100 * args[0].shape[0])  # pool bytes grow with the batch
    g = graphed(cuda, budget=450)
    for b in (1, 2):  # 100 + 200
        g(*inputs(b))
    assert list(k[0][0][0] for k in g.graphs) == [1, 2] and g.pool_bytes == 300 and cuda.releases == 0
    g(*inputs(1, seed=1))  # batch 1 used again: batch 2 is now the least recent
    g(*inputs(2 + 1))  # +300 > 450: batch 2 goes (not batch 1), its pool released
    assert list(k[0][0][0] for k in g.graphs) == [1, 3] and g.pool_bytes == 400 and cuda.releases == 1
    g(*inputs(5))  # 500 alone is over the budget: kept (it is the one in use), every other evicted
    assert list(k[0][0][0] for k in g.graphs) == [5] and g.pool_bytes == 500 and cuda.releases == 2
    for b in (1, 2, 3, 5):  # every shape still gives the eager result, captured again where it was evicted
        torch.testing.assert_close(g(*inputs(b, seed=b)), net(*inputs(b, seed=b)), rtol=0, atol=0)


@torch.no_grad()
def test_graphs_are_bounded_in_number_too():
    cuda = FakeCuda(pool=lambda args: 1)
    g = graphed(cuda, budget=10**9, max_graphs=3)
    for size in (4, 8, 12, 16, 20):
        g(*inputs(1, size))
    assert [k[0][0][-1] for k in g.graphs] == [12, 16, 20] and cuda.releases == 2


def test_with_gradients_on_the_unet_runs_eagerly():
    cuda = FakeCuda()
    g = graphed(cuda, budget=10_000)
    x, t, ctx = inputs()
    x.requires_grad_(True)
    out = g(x, t, ctx)
    out.sum().backward()
    assert not cuda.captured and torch.equal(x.grad, torch.full_like(x, 2.0))


@torch.no_grad()
def test_graph_pools_count_as_taken_when_the_pipeline_sizes_its_batches(tiny_config, monkeypatch):
    """max_batch works from the memory available; a graph's pool is reserved there but no other tensor can use it."""
    from conftest import build_models
    pipe = Pipeline(build_models(tiny_config), device="cpu")
    need = pipe.image_bytes(64, 64, 5.0)
    have = 40 * need
    monkeypatch.setattr("latentdiff.pipeline.available_memory", lambda device: have)
    cuda = FakeCuda(pool=lambda args: 20 * need)
    pipe.unet_call = GraphedUNet(pipe.unet, budget=10**12, capture=cuda.capture, release=cuda.release)
    assert pipe.max_batch(64, 64, 5.0) == int(0.7 * have) // need == 28
    pipe.unet_call(*inputs(1, 16, seed=0)[:2], torch.randn(1, 77, tiny_config.unet.context_dim))
    assert pipe.unet_call.pool_bytes == 20 * need
    assert pipe.max_batch(64, 64, 5.0) == int(0.7 * (have - 20 * need)) // need == 14
    greedy = FakeCuda(pool=lambda args: have)  # pools holding everything: a size is refused, naming the numbers
    pipe.unet_call = GraphedUNet(pipe.unet, budget=10**12, capture=greedy.capture, release=greedy.release)
    pipe.unet_call(*inputs(1, 16, seed=0)[:2], torch.randn(1, 77, tiny_config.unet.context_dim))
    with pytest.raises(ValueError, match="needs about .* but cpu has 0.0 GiB available"):
        pipe.max_batch(64, 64, 5.0)
