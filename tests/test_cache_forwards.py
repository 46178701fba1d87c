"""The forwards of --cache as functions of tensors (networks.refresh_forward, networks.cached_forward):
against the exact forward, with compiled blocks (what a GPU runs, minus the CUDA graphs), and the
input and output handling of GraphedForward with a CPU stand-in for the CUDA graph."""
from functools import partial

import pytest
import torch
import torch._dynamo.utils
import torch.nn.functional as F

from demask import core
from demask import kvcache
from demask import networks


@pytest.fixture(scope="module", params=["llada", "dream"])
def lm(request, tiny_llada, tiny_dream):
    return core.load_model(tiny_llada if request.param == "llada" else tiny_dream, device="cpu")


@pytest.fixture(scope="module")
def net(lm):
    return lm.net


def inputs(B, T, seed=0):
    """Token ids, a key mask with row 0 left-padded by 3, its positions and the last 8 queries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(10, 200, (B, T), generator=g)
    key_mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    key_mask[0, ..., :3] = False
    positions = (key_mask[:, 0, 0].long().cumsum(1) - 1).clamp(min=0)
    return x, positions, key_mask, torch.arange(T - 8, T).expand(B, -1)


def windows(starts, width):
    """[r, width]: for each (start, n) of `starts` the n positions from start, the last one repeated
    up to `width` (as BatchCache.positions_of pads)."""
    return torch.stack([s + torch.arange(width).clamp(max=n - 1) for s, n in starts])


@torch.no_grad()
def test_refresh_forward_is_the_exact_forward_and_keeps_every_layer(net):
    x, positions, key_mask, query = inputs(3, 24)
    logits, keys, values, hidden = networks.refresh_forward(net, x, positions, key_mask, query)
    assert torch.equal(logits, networks.forward_logits(net, x, positions, key_mask, query))
    blocks = net.parts()[1]
    kv_heads = getattr(blocks[0], "self_attn", blocks[0]).n_kv_heads
    assert keys.shape == values.shape == (len(blocks), 3, kv_heads, 24, net.head_dim)
    assert torch.equal(networks.head_logits(net, hidden, query), logits)


@torch.no_grad()
def test_cached_forward_of_rows_in_any_order(net):
    """Rows 2 and 0 of a 3-row cache, windows of different lengths (the shorter padded by repeats):
    on the refresh's input the logits are the exact forward's; computing every position of a changed
    input gives its exact forward whatever the cache holds."""
    x, positions, key_mask, query = inputs(3, 24)
    full, keys, values, hidden = networks.refresh_forward(net, x, positions, key_mask, query)
    cache = networks.KVCache(3)
    cache.store(torch.tensor([0, 1, 2]), keys, values, hidden)
    rows, computed = torch.tensor([2, 0]), windows([(8, 16), (16, 8)], 16)
    cached = networks.cached_forward(net, x[rows], positions[rows], key_mask[rows], query[rows], cache.keys,
                                   cache.values, cache.hidden, rows, computed)
    assert (cached - full[rows]).abs().max() < 1e-5
    other = torch.randint(10, 200, x.shape)
    everything = torch.arange(24).expand(2, -1)
    cached = networks.cached_forward(net, other[rows], positions[rows], key_mask[rows], query[rows], cache.keys,
                                   cache.values, cache.hidden, rows, everything)
    exact = networks.forward_logits(net, other[rows], positions[rows], key_mask[rows], query[rows])
    assert (cached - exact).abs().max() < 1e-5


@torch.no_grad()
def test_compiled_blocks_run_both_cache_forwards_and_match_eager(net):
    """The blocks compiled as fast_forwards compiles them (dynamic shapes, shared by all layers): the
    refresh and the cached forward match eager, and another shape of the same kind recompiles nothing."""
    blocks = [torch.compile(block, dynamic=True) for block in net.parts()[1]]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for B, T in [(3, 24), (4, 40)]:
        x, positions, key_mask, query = inputs(B, T, seed=T)
        eager = networks.refresh_forward(net, x, positions, key_mask, query)
        fast = networks.refresh_forward(net, x, positions, key_mask, query, blocks=blocks)
        assert all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for a, b in zip(fast, eager))
        _, keys, values, hidden = eager
        rows, computed = torch.tensor([2, 0]), windows([(T - 12, 12), (T - 8, 8)], 12)
        x[:, T - 6] = 7  # a commit inside the windows
        args = x[rows], positions[rows], key_mask[rows], query[rows], keys, values, hidden, rows, computed
        assert torch.allclose(networks.cached_forward(net, *args, blocks=blocks), networks.cached_forward(net, *args),
                              atol=1e-3, rtol=1e-3)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == 2  # one graph without and one with a cache, for every shape


class Replayed(networks.GraphedForward):
    """GraphedForward with a CPU stand-in for the CUDA graph: a replay runs the forward on the
    captured inputs and writes into the captured outputs, as a graph replay does."""

    def record(self, static):
        out = self.forward(*static)
        captured = out if isinstance(out, tuple) else (out,)

        class Graph:
            def replay(_):
                new = self.forward(*static)
                for t, value in zip(captured, new if isinstance(new, tuple) else (new,)):
                    t.copy_(value)
        self.captures = getattr(self, "captures", 0) + 1
        return Graph(), out


@torch.no_grad()
def test_graphed_forwards_copy_inputs_in_read_the_cache_in_place_and_return_copies(net):
    x, positions, key_mask, query = inputs(3, 24)
    refresh = Replayed(partial(networks.refresh_forward, net))
    first = refresh(x, positions, key_mask, query)
    flipped = x.flip(0), positions.flip(0), key_mask.flip(0), query
    second = refresh(*flipped)  # a replay on new values; what the first call returned stays
    assert refresh.captures == 1
    assert all(torch.equal(a, b) for a, b in zip(first, networks.refresh_forward(net, x, positions, key_mask, query)))
    assert all(torch.equal(a, b) for a, b in zip(second, networks.refresh_forward(net, *flipped)))

    rows, cache = torch.tensor([0, 1, 2]), networks.KVCache(3)
    cache.store(rows, *first[1:])
    cached = Replayed(partial(networks.cached_forward, net), keep=2, shared=(4, 5, 6))

    def both(cache, x, width=8):
        """The graphed and the plain cached forward of the `width` positions before the last 8."""
        args = (x, positions, key_mask, query, cache.keys, cache.values, cache.hidden, rows,
                windows([(16 - width, width)] * 3, width))
        return cached(*args), networks.cached_forward(net, *args)
    assert torch.equal(*both(cache, x))
    cache.store(rows, *second[1:])  # the cache changed in place: the graph reads it there
    assert torch.equal(*both(cache, x))
    assert cached.captures == 1 and next(iter(cached.graphs.values()))[1][4] is cache.keys
    other, changed = networks.KVCache(3), x.clone()
    other.store(rows, *first[1:])
    changed[:, 12] = 9
    assert torch.equal(*both(other, changed))  # another cache of the same shape is copied in
    both(other, x, 4), both(other, x, 6)  # two more shapes: the first one's graph is evicted (keep=2)
    assert cached.captures == 3 and len(cached.graphs) == 2


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@torch.no_grad()
def test_batch_cache_with_the_gpu_forwards_sees_what_the_eager_one_does(lm, mode):
    """BatchCache with the forwards fast_forwards makes for a batch (compiled blocks, the cache read
    in place), Replayed standing in for the CUDA graphs, against the eager BatchCache: rows in
    different blocks refreshing alone, finishing early, some calls asking for some queries."""
    def gpu_like():
        forwards = networks.fast_forwards(lm.net)[1]()
        for forward in forwards:
            forward.__class__ = Replayed
        return forwards
    ids, mask = core.left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]], lm.pad_id)
    P, G, L = ids.shape[1], 24, 8
    runs = []
    for forwards in (lm.cache_forwards, gpu_like):
        x, key = F.pad(ids, (0, G), value=lm.mask_id), F.pad(mask, (0, G), value=True)
        cache = kvcache.BatchCache(lm, mode, P, L)
        cache.refresh_forward, cache.cached_forward = forwards()
        calls = []
        for step in range(14):
            query = None if step % 3 else P + torch.tensor([[0, 5, 9]] * 3)
            calls.append((cache(x, key, None, query), [(r.tolist(), c) for r, c in cache.work]))
            for row in range(3):  # row i commits i + 1 tokens per call
                masked = (x[row, P:] == lm.mask_id).nonzero().squeeze(1)[:row + 1]
                x[row, P + masked] = 40 + step
        runs.append(calls)
    (eager, fast), captures = runs, (cache.refresh_forward.captures, cache.cached_forward.captures)
    assert [w for _, w in eager] == [w for _, w in fast]
    assert any(len(w) == 2 for _, w in eager) and captures[0] > 1  # mixed calls, rows refreshing alone
    assert all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for (a, _), (b, _) in zip(fast, eager))
