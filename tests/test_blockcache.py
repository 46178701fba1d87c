"""The block-diffusion handle (demask/blockcache.py): block-causal mask, and the exact cache of finished
blocks equal to the uncached block-causal forward for every state a decoder can pass, through the
harness's decode path too. The tiny LLaDA (row i predicts token i) and Dream (row i predicts i + 1)
networks stand in for the block-diffusion families here, with a block size set on them: the cache only
needs a network's blocks and its shift."""
import os
import random

import pytest
import torch

from demask import blockcache, blocknets, core, decoders, kvcache
from demask.settings import RunSettings

S = 4


def block_model(path):
    lm = core.load_model(path, device="cpu")
    lm.net.block_size = lm.block_size = S
    lm.block_layers = list(lm.net.parts()[1])
    return lm


@pytest.fixture(scope="module", params=["llada", "dream"])
def lm(request, tiny_llada, tiny_dream):
    return block_model(tiny_llada if request.param == "llada" else tiny_dream)


def padded_batch(lm, lengths, gen_length, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, lm.n_tokens) for _ in range(n)] for n in lengths]
    ids, mask = core.left_pad(prompts, lm.pad_id)
    x = torch.cat([ids, torch.full((len(prompts), gen_length), lm.mask_id)], 1)
    key_mask = torch.cat([mask, torch.ones(len(prompts), gen_length, dtype=torch.bool)], 1)
    return x, key_mask, ids.shape[1]


def test_block_mask_is_block_causal_from_the_generation_start():
    key_mask = torch.tensor([[False, True, True, True, True, True, True, True]])
    mask = blocknets.block_mask(key_mask, prompt_width=3, block_size=2)[0, 0]
    # blocks of padded index 0..7 with P = 3, S = 2: -2, -1, -1, 0, 0, 1, 1, 2
    assert mask[4].tolist() == [False, True, True, True, True, False, False, False]
    assert mask[7].tolist() == [False, True, True, True, True, True, True, True]
    assert mask[1].tolist() == [False, True, True, False, False, False, False, False]
    assert mask[0].tolist() == [True] + [False] * 7  # a padding query sees itself only


def test_cache_equals_the_full_block_causal_forward_at_every_state(lm):
    """Unmask in block order (some steps finish a block, one re-masks a finished token, one queries
    every position): each call's logits of the rows with a mask equal the uncached forward's."""
    x, key_mask, P = padded_batch(lm, [5, 9, 7], gen_length=12)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    cache = blockcache.BlockCache(lm, P)
    rng = random.Random(1)
    widths = []
    for step in range(14):
        block = decoders.current_block(x[:, P:] == lm.mask_id, S, done=0)
        query = None if step == 6 else P + block[:, None] * S + torch.arange(S)  # as BlockDecoder asks
        got = cache(x, key_mask, positions, query)
        want = lm.logits(x, key_mask, positions, query, prompt_width=P)
        live = (x == lm.mask_id).any(1)
        assert torch.allclose(got[live], want[live], atol=1e-5), step
        widths.append(cache.work[0][1])
        for row in range(3):
            masked = (x[row, P:] == lm.mask_id).nonzero().squeeze(1)
            if len(masked):
                first = masked[masked // S == masked[0] // S]
                x[row, P + first[rng.randrange(len(first))]] = rng.randrange(10, lm.n_tokens)
        if step == 9:
            x[0, P] = (x[0, P] + 1) % lm.n_tokens  # a decoder that changes a finished token
    assert widths[0] == P + S                 # the first call: the prompt and the first block
    assert max(widths[1:6]) <= 2 * S          # later ones: the current block (and one just finished)
    assert widths[6] == x.shape[1] - (P + S)  # without query rows: every position after the cached block


def test_cache_keeps_finished_rows_and_refreshes_when_positions_change(lm):
    x, key_mask, P = padded_batch(lm, [6, 6], gen_length=8, seed=3)
    cache = blockcache.BlockCache(lm, P)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    cache(x, key_mask, positions, None)
    x[1, P:] = 5  # row 1 finished: not computed, zeros
    got = cache(x, key_mask, positions, None)
    assert got[1].abs().sum() == 0
    shifted = positions + 1
    want = lm.logits(x, key_mask, shifted, None, prompt_width=P)
    assert torch.allclose(cache(x, key_mask, shifted, None)[0], want[0], atol=1e-5)
    assert cache.work[0][1] == x.shape[1]


class Uncached:
    """A stand-in for the batch's cache that runs the full block-causal forward at every call."""

    def __init__(self, lm, prompt_width):
        self.lm, self.P, self.work = lm, prompt_width, []

    def __call__(self, x, key_mask, positions, query_idx):
        self.work = [(torch.arange(x.shape[0]), x.shape[1])]
        return self.lm.logits(x, key_mask, positions, query_idx, prompt_width=self.P)


@pytest.mark.parametrize("name", ["confidence_greedy", "threshold", "klass", "wino", "left_to_right"])
def test_decoders_through_the_cache_equal_the_uncached_forward(lm, monkeypatch, name):
    """The harness's decode path (rule checks, counting) with the block cache gives the same tokens
    and the same counted forwards as with the uncached block-causal forward, batched and left-padded."""
    run = RunSettings(gen_length=12, steps=12, block_length=S)
    decoder = decoders.build_decoder(name, lm.mask_id, run, {})
    rng = random.Random(2)
    prompts = [[rng.randrange(10, lm.n_tokens) for _ in range(n)] for n in (4, 7, 5)]
    ids, mask = core.left_pad(prompts, lm.pad_id)
    cached = core.decode_rows(run, lm, decoder, ids, mask, [0, 1, 2])
    monkeypatch.setattr(kvcache, "for_batch", lambda run, lm, width: Uncached(lm, width))
    uncached = core.decode_rows(run, lm, decoder, ids, mask, [0, 1, 2])
    assert cached[0] == uncached[0] and cached[1] == uncached[1]


def test_original_harness_decoder_runs_on_a_block_model():
    """A pasted batch-1 decoder calls model(x).logits without query rows: every position after the
    cached prefix is computed, the result equals the uncached forward's decode (the bundled model:
    the decoder takes the argmax over every logit, the random models' padding ids included)."""
    lm = block_model(os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "tiny-llada"))
    import custom_demask_eval
    namespace = dict(vars(custom_demask_eval))
    exec(open(os.path.join(os.path.dirname(__file__), "fixtures", "original_harness_decoder.py")).read(), namespace)
    run = RunSettings(gen_length=8, steps=8, block_length=S)
    decoder = namespace["DemaskDecoder"](lm.mask_id)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    cached = core.decode_rows(run, lm, decoder, ids, mask, [0])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kvcache, "for_batch", lambda run, lm, width: Uncached(lm, width))
        uncached = core.decode_rows(run, lm, decoder, ids, mask, [0])
    assert cached[:2] == uncached[:2]


def test_prefix_and_dual_caches_are_refused_for_block_models(lm):
    with pytest.raises(ValueError, match="exact cache of finished blocks"):
        kvcache.for_batch(RunSettings(cache="dual"), lm, 8)
    with pytest.raises(ValueError, match="prompt width"):
        lm.logits(torch.full((1, 8), lm.mask_id), None)
