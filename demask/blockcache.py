"""Block-diffusion models in the model handle: the block-causal attention mask and the exact KV cache
of finished blocks.

SDAR / TraDo, Fast-dLLM v2 and LLaDA2.0 attend causally between blocks of S tokens and
bidirectionally inside a block, so the keys and values of a block depend only on it and the blocks
before it: once a block holds no mask token, what it contributes to every later forward is fixed and
can be kept, exactly. The handle does this for every decoder, which keeps calling model(x) as before
and gets the logits of the block-causal forward of the x it passed (see BlockCache).

The block grid starts at the generation: with a left-padded batch of prompt width P, the token at
padded index k is in block floor((k - P) / S), the prompt's tokens in blocks below 0. The authors'
code starts it at the sequence's first token instead (its first generated block then also holds the
prompt's last P mod S tokens); the two are the same model whenever the prompt length is a multiple of
S. Starting at the generation keeps every row's blocks on the decoders' block grid (block_length = S)
whatever its prompt length, in a batch too; docs/models.md lists it as a deviation.
"""
import torch

from . import networks
from .blocknets import block_mask, block_of


def first_true(flags, default):
    """[R] long: each row's first True position in flags [R, T], `default` where a row has none."""
    return torch.where(flags.any(1), flags.float().argmax(1).long(), torch.full_like(flags[:, 0], default, dtype=torch.long))


def block_start(index, prompt_width, block_size):
    return prompt_width + block_size * block_of(index, prompt_width, block_size)


def call_inputs(x, key_mask, positions, query_idx):
    """A cache's view of a call: (key mask, positions, queries) [R, T] / [R, Q] with their defaults
    (no padding, positions counted over the key mask, every position queried)."""
    R, T = x.shape
    keys = torch.ones_like(x, dtype=torch.bool) if key_mask is None else key_mask
    positions = (keys.long().cumsum(1) - 1).clamp(min=0) if positions is None else positions.to(x.device)
    query = torch.arange(T, device=x.device).expand(R, T) if query_idx is None else query_idx
    return keys, positions, query


def deviations(lm):
    """The entries summary.json's deviation list gets for a block-diffusion model's run."""
    if not lm.block_size:
        return []
    return [f"Block diffusion (block size {lm.block_size}): the block grid starts at the generation (the token at "
            "padded index k is in block floor((k - P) / S)); the authors' code starts it at the sequence's first token, "
            "the same model when the prompt length is a multiple of S.",
            "Block diffusion: the model handle keeps an exact cache of finished blocks' keys and values and computes "
            "only from the first block not held to the last block a query needs; a just-finished block is computed "
            "again in the next forward, where the authors' code spends one extra forward per block storing it. "
            "Forwards are the decoder's calls."]


class BlockCache:
    """The exact cache of one batch's model handle: called as lm.logits is, (x, key_mask, positions,
    query_idx) -> fp32 logits [R, Q, V], rows without a mask token not computed (zeros) unless no row
    has one.

    Per row it keeps every layer's keys and values and the last hidden states of all positions, and
    `valid`: the first position it does not hold exactly. A call computes, for the rows it computes,
    the positions from the smallest `valid` among them to the end of the last block a query needs
    (the block of query - shift): the positions before are attended in the cache, the blocks after
    cannot be attended by any query. Afterwards a row holds exactly everything before its first
    block with a mask token. A row's `valid` falls back to the start of the first block whose tokens
    differ from those it was computed from (a decoder that re-masks), and to 0 when its key mask or
    positions change; a call with another number of rows starts a new cache. The folded-in work: a
    block that has just been finished is computed once more in the next call (its keys and values
    with its final tokens), in the same forward as the next block, where the authors' code spends an
    extra forward per block on it.
    """

    def __init__(self, lm, prompt_width):
        self.lm, self.P, self.S = lm, prompt_width, lm.net.block_size
        self.layers = lm.block_layers
        self.rows, self.work = None, []

    def reset(self, x, keys, positions):
        """A new cache; its key and value buffers are made at the first store (start 0)."""
        R, T = x.shape
        embed = self.lm.net.parts()[0]
        self.rows, self.keys, self.values = R, None, None
        self.hidden = torch.zeros(R, T, embed.weight.shape[1], dtype=embed.weight.dtype, device=x.device)
        self.valid = torch.zeros(R, dtype=torch.long, device=x.device)
        self.x, self.key_mask, self.positions = x.clone(), keys.clone(), positions.clone()

    def invalidate(self, x, keys, positions):
        """Lower each row's `valid` to what still holds for this call's inputs."""
        T = x.shape[1]
        first = first_true(x != self.x, T)
        self.valid = torch.minimum(self.valid, block_start(first, self.P, self.S).clamp(min=0))
        moved = (keys != self.key_mask).any(1) | (positions != self.positions).any(1)
        self.valid = torch.where(moved, torch.zeros_like(self.valid), self.valid)

    @torch.no_grad()
    def __call__(self, x, key_mask, positions, query_idx):
        R, T = x.shape
        keys, positions, query = call_inputs(x, key_mask, positions, query_idx)
        if self.rows != R or self.x.shape[1] != T:
            self.reset(x, keys, positions)
        self.invalidate(x, keys, positions)

        # the rows to compute and the window of positions: decided on the host (one sync)
        masked = x == self.lm.mask_id
        live = masked.any(1)
        compute = live if bool(live.any()) else torch.ones_like(live)
        rows = compute.nonzero().squeeze(1)
        needed = (query[rows] - self.lm.net.shift).clamp(min=0).max()
        end = torch.clamp(block_start(needed, self.P, self.S) + self.S, max=T)
        start = torch.minimum(self.valid[rows].min(), block_start(end - 1, self.P, self.S).clamp(min=0))
        start, end = int(start), int(end)

        # the forward of the window against the cache, then what now holds exactly
        self.forward_window(x, keys, positions, rows, start, end)
        first_mask = first_true(masked, T)
        held = torch.minimum(block_start(first_mask, self.P, self.S).clamp(min=0), torch.full_like(first_mask, end))
        self.valid[rows] = held[rows]
        self.x[rows], self.key_mask[rows], self.positions[rows] = x[rows], keys[rows], positions[rows]
        self.work = [(rows, end - start)]

        logits = torch.zeros(R, query.shape[1], self.lm.vocab_size, device=x.device)
        logits[rows] = networks.head_logits(self.lm.net, self.hidden[rows], query[rows]).float()
        return logits

    def forward_window(self, x, keys, positions, rows, start, end):
        """Run positions [start, end) of the rows `rows` through the layers, attending to the cached
        keys and values before `start`; store their keys, values and last hidden states."""
        net = self.lm.net
        computed = torch.arange(start, end, device=x.device).expand(len(rows), -1)
        seen = keys[rows] if start > 0 else keys[rows, :end]  # from the start, no cached key is attended
        mask = block_mask(seen, self.P, self.S, computed)
        rope = networks.rotary_tables(positions[rows, start:end], net.rope_dim, net.theta)
        h = net.parts()[0](x[rows, start:end])
        for i, layer in enumerate(self.layers):
            cached = (self.keys[i], self.values[i], rows, computed) if start > 0 else None
            h, k, v = layer(h, rope, mask, cached)
            self.store(i, rows, k[:, :, start:end], v[:, :, start:end], start, x.shape[1])
        self.hidden[rows, start:end] = h

    def store(self, layer, rows, k, v, start, width):
        """Keep a layer's keys and values [r, kv heads, positions, head_dim] of the rows `rows` for the
        window's positions (from `start`)."""
        if self.keys is None:
            n_layers = len(self.layers)
            self.keys = k.new_zeros((n_layers, self.rows, k.shape[1], width, k.shape[-1]))
            self.values = torch.zeros_like(self.keys)
        end = start + k.shape[2]
        self.keys[layer, rows, :, start:end], self.values[layer, rows, :, start:end] = k, v
