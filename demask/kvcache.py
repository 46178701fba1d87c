"""`--cache prefix|dual`: approximate KV caching after Fast-dLLM, in the model handle of one batch.

Fast-dLLM (Wu et al., arXiv 2505.22618; NVlabs/Fast-dLLM llada/generate.py, generate_with_prefix_cache
and generate_with_dual_cache) decodes block by block: the first forward of a block runs over the whole
sequence and keeps every layer's keys and values; the block's later forwards compute only the block
and everything after it (prefix) or only the block (dual), attending to the cached keys and values of
the other positions, which therefore stay as they were at the block's first forward. Here the model
handle does this for every decoder, which keeps calling model(x) as before (see BatchCache).
"""
import torch

from . import blockcache, networks
from .decoders import current_block
from .settings import CACHE_MODES as MODES  # noqa: F401 (the --cache choices)

def tag(run):
    """'+prefix' / '+dual' in run names and fingerprints of cached runs, '' for exact ones."""
    return f"+{run.cache}" if run.cache != "none" else ""


def for_batch(run, lm, prompt_width):
    """The BatchCache of one batch of a cached run, None for an exact one; a block-diffusion model's
    exact BlockCache (blockcache.py) always."""
    if lm.block_size:
        if run.cache != "none":
            raise ValueError(f"--cache {run.cache}: block-diffusion models keep their own exact cache of "
                             "finished blocks (docs/models.md); run them with --cache none")
        return blockcache.BlockCache(lm, prompt_width)
    if run.cache == "none":
        return None
    return BatchCache(lm, run.cache, prompt_width, run.block_length)


def deviations(run):
    """The entry summary.json's deviation list gets for a cached run (none for an exact one)."""
    mode = run.cache
    if mode == "none":
        return []
    computed = "the block and every position after it" if mode == "prefix" else "the block"
    return [f"--cache {mode}: approximate KV caching after Fast-dLLM (arXiv 2505.22618; NVlabs/Fast-dLLM "
            f"llada/generate.py generate_with_{mode}_cache): a row's first forward in a block runs in full and keeps "
            f"every layer's keys and values; its later forwards in the block compute only {computed}, attending to "
            "the cached keys and values of the other positions, whose logits are those of the block's first forward. "
            "Unlike Fast-dLLM, the cache is kept per row and also refreshed when the row's key mask, positions or the "
            "token at a position not recomputed changed; for Dream the computed positions start one to the left, at "
            "the one that predicts the block's first token (Fast-dLLM's Dream code reuses the block's first output "
            "for it and commits the block's first token at the full forward)."]


class BatchCache:
    """The KV cache of one batch's model handle: called as lm.logits is, (x, key_mask, positions,
    query_idx) -> fp32 logits [R, Q, V], rows without a mask token not computed (zeros) unless no
    row has one.

    A row's current block is the first block of its generation that still holds a mask token. A row
    is refreshed (a full forward that stores its keys, values and last hidden states) on the first
    call, when the call has another number of rows than the last one, when its current block changed,
    when its generation holds no mask, and when its key mask, its positions or the token at a
    position the mode does not recompute differ from its last refresh. Otherwise only the mode's
    positions are computed (`window`), and logits of the other positions come from the refresh's
    hidden states. `work` lists the forwards of the last call: (its rows, positions computed per row).
    The two forwards are the batch's lm.cache_forwards() (networks.refresh_forward and cached_forward;
    on a GPU compiled blocks replayed as CUDA graphs of the batch's own).
    """

    def __init__(self, lm, mode, prompt_width, block_length):
        self.lm, self.mode, self.P, self.L = lm, mode, prompt_width, block_length
        self.refresh_forward, self.cached_forward = lm.cache_forwards()
        self.cache, self.work = None, []

    def window(self, block, T):
        """[R, T] bool: the positions a cached forward computes. From the position that predicts the
        block's first token (the block's start; Dream: one to the left) to the block's end (dual) or
        to the end of the sequence (prefix)."""
        start = self.P + block * self.L
        end = start + self.L if self.mode == "dual" else torch.full_like(start, T)
        i = torch.arange(T, device=block.device)[None]
        return (i >= (start - self.lm.net.shift)[:, None]) & (i < end[:, None])

    @torch.no_grad()
    def __call__(self, x, key_mask, positions, query_idx):
        R, T = x.shape
        keys, positions, query = blockcache.call_inputs(x, key_mask, positions, query_idx)
        if self.cache is None or self.cache.n_rows != R:
            self.cache, self.block = networks.KVCache(R), torch.full((R,), -1, device=x.device)
            self.x, self.keys, self.positions = x.clone(), keys.clone(), positions.clone()

        # which rows to refresh, which to compute in part: decided on the host (one sync)
        masked = x[:, self.P:] == self.lm.mask_id
        block = current_block(masked, self.L)
        window = self.window(block, T)
        stale = ((block < 0) | (block != self.block) | (keys != self.keys).any(1)
                 | (positions != self.positions).any(1) | ((x != self.x) & ~window).any(1))
        live = (x == self.lm.mask_id).any(1)
        live, stale, width = torch.stack([live.long(), stale.long(), window.sum(1)]).tolist()
        compute = live if any(live) else [1] * R
        refresh = [i for i in range(R) if compute[i] and stale[i]]
        part = [i for i in range(R) if compute[i] and not stale[i]]
        order = torch.tensor(refresh + part, dtype=torch.long, device=x.device)
        fresh, kept = order[:len(refresh)], order[len(refresh):]

        # the forwards; a refresh keeps the rows' inputs
        logits = torch.zeros(R, query.shape[1], self.lm.vocab_size, device=x.device)
        attend = None if key_mask is None else key_mask[:, None, None, :]
        self.work = []
        if refresh:
            out, *stored = self.refresh_forward(x[fresh], positions[fresh], rows_of(attend, fresh), query[fresh])
            self.cache.store(fresh, *stored)
            self.x[fresh], self.keys[fresh] = x[fresh], keys[fresh]
            self.positions[fresh], self.block[fresh] = positions[fresh], block[fresh]
            logits[fresh] = out.float()
            self.work.append((fresh, T))
        if part:
            computed = self.positions_of(window[kept], max(width[i] for i in part))
            c = self.cache
            out = self.cached_forward(x[kept], positions[kept], rows_of(attend, kept), query[kept], c.keys, c.values,
                                      c.hidden, kept, computed)
            logits[kept] = out.float()
            self.work.append((kept, computed.shape[1]))
        return logits

    @staticmethod
    def positions_of(window, width):
        """[r, width] indices of each row's window (one run of positions, at most `width` long), the
        shorter runs padded by repeating their last position (a repeat computes the same keys and
        values again)."""
        first, count = window.float().argmax(1).long(), window.sum(1)
        offsets = torch.arange(width, device=window.device)[None]
        return first[:, None] + torch.minimum(offsets, (count - 1)[:, None])


def rows_of(t, rows):
    return None if t is None else t[rows]
