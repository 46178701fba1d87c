"""Decoders that draft, verify and may revoke: WINO, Saber and FreeDave.

Each one is checked against its authors' code run on the bundled tiny model
(tests/test_verifying.py, tests/fixtures/{wino,saber,freedave}_upstream.json); docs/decoders.md says
where and why each differs from that code. All three re-mask tokens they wrote (`remasks = True`).
"""
import torch
import torch.nn.functional as F

from .decoders import (POSITION_SCORES, BlockDecoder, Range, clean_confidence, current_block, propose_tokens,
                       register_method, top_k_commit)


class SeenInput:
    """The model handle of one decode, remembering the last input the decoder handed to it (`x`):
    WINO and Saber read the tokens already written in the window."""

    def __init__(self, model):
        self.model, self.x = model, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, **kwargs):
        self.x = x
        return self.model(x, **kwargs)


class WindowDecoder(BlockDecoder):
    """BlockDecoder whose `select` can read the current tokens of the window (`window`)."""

    def decode(self, model, input_ids, gen_length, steps, block_length):
        return super().decode(SeenInput(model), input_ids, gen_length, steps, block_length)

    @staticmethod
    def window(batch):
        """([B, L] tokens now in each row's window, [B, L] their positions within the generation)."""
        gen = batch.model.x[:, -batch.gen_length:]
        block = current_block(gen == batch.model.mask_id, batch.block_length, done=0)
        pos = block[:, None] * batch.block_length + torch.arange(batch.block_length, device=gen.device)
        return gen.gather(1, pos), pos


# ---------------------------------------------------------------------------
# WINO

WINO_FIRST_LAST_ACCEPT = 30  # decoding_wino's last_accept at the start of each block


def wino_accept_cap(masks):
    """decoding_wino's max_accept: min(max(int(0.7 m), 5), 20) for m masks in the window, with
    0.7 m in float32 as upstream's tensor arithmetic gives it."""
    return (masks.float() * 0.7).long().clamp(min=5, max=20)


class WinoDecoder(WindowDecoder):
    """WINO, wide-in narrow-out (Hong et al., arXiv 2507.18578; Feng-Hong/WINO-DLLM LLaDA/decoding.py,
    decoding_wino), per row and window.

    Wide in: every masked position of the window whose clean confidence is > `threshold` is drafted
    (at most min(max(int(0.7 m), 5), 20) of them, the most confident, m = masks in the window;
    at least the most confident one). Narrow out: when a forward drafted more than one token, the
    window's tokens written at earlier forwards whose probability is < `threshold_back` are re-masked;
    if there are at least as many as the previous forward drafted (30 at a window's first forward),
    only that number minus one, the least probable. One forward per step; `steps` is not used.

    Deviation: upstream verifies with a shadow copy of the window appended to the input (all masks,
    each seeing everything but its own position, through a 4-D attention mask and repeated position
    ids). The harness's model handle takes one [B, P + gen_length] input with a key mask per row, so
    here the probability of a written token is read at its own, visible, position in the same
    forward. The test runs upstream's code with a model that answers the shadow rows so and gets
    identical tokens and forward counts; with threshold_back=0 (nothing revoked) unmodified upstream
    gives identical ones too.
    """
    remasks = True
    ranges = {**BlockDecoder.ranges, "threshold": Range(0, 1), "threshold_back": Range(0, 1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, threshold=0.6, threshold_back=0.9):
        super().__init__(mask_id, temperature, top_p)
        self.threshold, self.threshold_back = float(threshold), float(threshold_back)

    def info(self, gen_length, steps, block_length):
        return dict(threshold=self.threshold, threshold_back=self.threshold_back, verification="visible position")

    def start(self, batch):
        batch.last_accept = torch.full((batch.size,), WINO_FIRST_LAST_ACCEPT, device=batch.device)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, _ = self.propose(logits, batch)
        draft = self.draft(clean_confidence(p, tokens), candidates)
        accepted = draft.sum(1)
        batch.last_accept = torch.where(step == 0, WINO_FIRST_LAST_ACCEPT, batch.last_accept)
        now, _ = self.window(batch)
        written = ~batch.masked & candidates.any(1, keepdim=True)
        remask = self.revoke(clean_confidence(p, now), written, batch.last_accept) & (accepted > 1)[:, None]
        batch.last_accept = torch.where(candidates.any(1), accepted, batch.last_accept)
        return draft | remask, torch.where(remask, self.mask_id, tokens)

    def draft(self, conf, candidates):
        """Wide in: the masked positions above `threshold`, capped, at least the best one."""
        masks = candidates.sum(1)
        draft = candidates & (conf > self.threshold)
        cap = wino_accept_cap(masks)
        draft = torch.where((draft.sum(1) > cap)[:, None], top_k_commit(conf, candidates, cap), draft)
        best = top_k_commit(conf, candidates, torch.ones_like(masks))
        return torch.where(draft.any(1, keepdim=True), draft, best)

    def revoke(self, back, written, last_accept):
        """Narrow out: written tokens below `threshold_back`, at most last_accept - 1 of them."""
        low = written & (back < self.threshold_back)
        capped = top_k_commit(-back, written, last_accept - 1)
        return torch.where((low.sum(1) >= last_accept)[:, None], capped, low)


# ---------------------------------------------------------------------------
# Saber


class SaberDecoder(WindowDecoder):
    """Saber (Dong et al., arXiv 2510.18165; zhaoyMa/Saber decoding.py, generate_with_saber), per row
    and window.

    Adaptive acceleration: commit the masked positions of the window whose confidence is above the
    mean confidence at which the tokens so far were committed (each position's latest commit, tokens
    re-masked since included; 1 before any), at least the `n` most confident. Backtracking: unless the
    window is then full, re-mask the max(n // 2, ceil(c / 8)) written tokens of the window (at most
    c - 1; c = max(n, positions above the mean)) whose confidence fell most since the previous forward
    (confidence = probability of the model's proposal at the position, masked or not, in float32 as
    upstream). One forward per step; `steps` is not used.

    Deviations, none of which arises with one window (upstream's setting, block_length =
    gen_length): upstream re-masks written tokens of earlier windows too and then commits in two
    windows at once, which the harness's window order forbids, so only the current window's tokens
    are re-masked; and at a window's first forward, where only earlier windows' tokens have a previous
    confidence, nothing is re-masked. When fewer than `n` masks are left, upstream's top-n also picks
    positions outside the candidates (a prompt position in practice), whose confidence then enters
    the mean; here only the candidates are committed.
    """
    remasks = True
    ranges = {**BlockDecoder.ranges, "n": Range(1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, n=2):
        super().__init__(mask_id, temperature, top_p)
        self.n = int(n)

    def info(self, gen_length, steps, block_length):
        return dict(n=self.n, remask_scope="current window")

    def start(self, batch):
        G, L = batch.gen_length, batch.block_length
        first_window = torch.arange(G, device=batch.device) < L
        batch.last_conf = torch.where(first_window, 0.0, -torch.inf).expand(batch.size, G).clone()
        batch.final_conf = torch.full((batch.size, G), -torch.inf, device=batch.device)

    def select(self, logits, candidates, k, step, batch):
        tokens, _, _ = self.propose(logits, batch)
        conf = F.softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        _, pos = self.window(batch)
        active = candidates.any(1, keepdim=True)
        delta = conf - batch.last_conf.gather(1, pos)
        delta = torch.where(torch.isfinite(delta), delta, torch.inf)
        batch.last_conf.scatter_(1, pos, torch.where(active, conf, batch.last_conf.gather(1, pos)))
        above = candidates & (conf > self.mean_commit_conf(batch, pos)[:, None])
        at_least = torch.full((batch.size,), self.n, device=conf.device)
        commit = torch.where((above.sum(1) < self.n)[:, None], top_k_commit(conf, candidates, at_least), above)
        batch.final_conf.scatter_(1, pos, torch.where(commit, conf, batch.final_conf.gather(1, pos)))
        remask = self.backtrack(delta, candidates, commit, batch.masked, above.sum(1).clamp(min=self.n))
        return commit | remask, torch.where(remask, self.mask_id, tokens)

    @staticmethod
    def mean_commit_conf(batch, pos):
        """[B] float32: the mean of the commit confidences of the generation up to the window's end, 1 if
        none; per row, in position order, as upstream's float32 mean (the confidences are often within
        float32 rounding of each other, so the order of the sum matters)."""
        means = torch.ones(batch.size, device=pos.device)
        for r, end in enumerate((pos[:, -1] + 1).tolist()):
            seen = batch.final_conf[r, :end]
            seen = seen[torch.isfinite(seen)]
            if len(seen):
                means[r] = seen.mean()
        return means

    def backtrack(self, delta, candidates, commit, masked, fixed):
        """The written tokens of the window to re-mask: the lowest confidence changes."""
        left = candidates & ~commit
        written = (~masked | commit) & torch.isfinite(delta) & left.any(1, keepdim=True)
        count = torch.minimum(torch.maximum(torch.full_like(fixed, self.n // 2), (fixed + 7) // 8), fixed - 1)
        return top_k_commit(-delta, written, count)


# ---------------------------------------------------------------------------
# FreeDave


class FreeDaveRow:
    """One row's FreeDave state: the verified state `base` (a generation, [G]), the proposal of its
    logits over its window, the drafts of the current round, the longest verified chain of them
    (`accepted`), the forwards counted and the model calls upstream makes (`calls`)."""

    def __init__(self, gen, block_length, draft_steps, mask_id):
        self.base, self.L, self.D, self.mask_id = gen, block_length, draft_steps, mask_id
        self.drafts, self.next, self.forwards, self.calls = [], 0, 0, 0
        self.proposal = None

    def window_start(self, gen):
        return int(current_block((gen == self.mask_id)[None], self.L, done=0)[0]) * self.L

    def pending(self):
        """The generation to evaluate at the next forward, or None when the row is finished."""
        if self.drafts:
            return self.drafts[self.next]
        return self.base if (self.base == self.mask_id).any() else None

    def query_start(self):
        """The generation position where the window of the pending evaluation starts."""
        return self.start if self.drafts else self.window_start(self.base)

    def take(self, tokens, score):
        """The proposal (tokens and scores over the window) from the logits of the pending generation."""
        self.forwards += 1
        if not self.drafts:
            self.calls += 1
            self.proposal = tokens, score
            self.start_round()
            return
        if self.next == self.accepted:
            self.verify(self.next, tokens, score)
        self.next += 1
        self.skip_finished_drafts()

    def start_round(self):
        """Draft k holds the base plus its k + 1 best proposed positions; with one mask left in the
        window the best is written without a forward."""
        tokens, score = self.proposal
        start = self.window_start(self.base)
        masked = self.base[start:start + self.L] == self.mask_id
        order = torch.argsort(torch.where(masked, score, -torch.inf), descending=True, stable=True)
        self.ranked = [(start + int(i), int(tokens[i])) for i in order[:int(masked.sum())]]
        if len(self.ranked) <= 1:
            self.base = self.base.clone()
            self.base[self.ranked[0][0]] = self.ranked[0][1]
            return
        self.drafts, self.next, self.accepted, self.start = [], 0, 0, start
        draft = self.base
        for position, token in self.ranked[:self.D]:
            draft = draft.clone()
            draft[position] = token
            self.drafts.append(draft)
        self.calls += 1
        self.skip_finished_drafts()

    def verify(self, k, tokens, score):
        """Draft k is verified: its proposal becomes the one to continue from, and draft k + 1 is
        verified when the best step from draft k writes exactly draft k + 1's new token."""
        self.proposal = tokens, score
        masked = self.drafts[k][self.start:self.start + self.L] == self.mask_id
        if k + 1 < len(self.drafts) and masked.any():
            best = int(torch.argsort(torch.where(masked, score, -torch.inf), descending=True, stable=True)[0])
            if (self.start + best, int(tokens[best])) == self.ranked[k + 1]:
                self.accepted = k + 1

    def skip_finished_drafts(self):
        """Drafts without a mask are not evaluated (their logits are never read); after the round's
        last draft the verified one becomes the base."""
        while self.next < len(self.drafts) and not (self.drafts[self.next] == self.mask_id).any():
            self.next += 1
        if self.next < len(self.drafts):
            return
        self.base, self.drafts = self.drafts[self.accepted], []
        if (self.base[self.start:self.start + self.L] == self.mask_id).any():
            self.start_round()


class FreeDaveDecoder:
    """FreeDave, free draft-and-verification (Wu and Zhang, arXiv 2510.00294; cychomatica/FreeDave
    generation/core.py, block_decode_with_full_attention_FreeDave), draft_mode batch_expanding,
    without early exit or cache.

    One-token-per-step decoding (confidence top-1 per forward, window by window: the harness's
    `confidence_greedy` with steps = gen_length) computes the logits of one state per forward.
    FreeDave drafts the next `draft_steps` states of that decoding from one set of logits (draft k =
    the k + 1 most confident proposals written) and evaluates them together; draft k + 1 is verified
    when the best step from draft k's logits writes exactly its new token, and decoding continues
    from the longest verified chain. Its generation therefore equals one-token-per-step decoding.
    A window's first forward evaluates the state as it is; its last mask is written without one.

    Forwards: upstream evaluates the drafts of a round in one batched model call, its NFE counts
    the call. The harness's handle takes one state per sample per forward and counts every state
    evaluated, so each draft is a forward here: more forwards than one-token-per-step decoding, in
    fewer model calls (`last_calls`: per row of the last decode, the calls upstream makes, its NFE). Drafts with no mask
    left are not evaluated (their logits are never read; upstream computes them). Rejected drafts
    are withdrawn (`remasks = True`). `steps` is not used. At most 4 drafts: a row then needs at most
    about 4 x gen_length forwards, the harness's forward budget.
    """
    batched = True
    remasks = True
    ranges = {"temperature": Range(0), "top_p": Range(0, 1, open_low=True), "draft_steps": Range(1, 4)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, draft_steps=4):
        if int(draft_steps) != draft_steps:
            raise ValueError(f"freedave draft_steps must be an integer, got {draft_steps!r}")
        self.mask_id, self.temperature, self.top_p, self.draft_steps = mask_id, temperature, top_p, int(draft_steps)
        self.last_calls = []

    def info(self, gen_length, steps, block_length):
        return dict(draft_steps=self.draft_steps, counted="each draft evaluated")

    @torch.no_grad()
    def decode(self, model, input_ids, gen_length, steps, block_length):
        B, P = input_ids.shape
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        rows = [FreeDaveRow(x[r, P:].clone(), block_length, self.draft_steps, self.mask_id) for r in range(B)]
        offsets = torch.arange(block_length, device=x.device)
        family = getattr(model, "family", "llada")
        while True:
            pending = [row.pending() for row in rows]
            if all(gen is None for gen in pending):
                break
            for r, gen in enumerate(pending):
                x[r, P:] = rows[r].base if gen is None else gen
            starts = torch.tensor([0 if gen is None else row.query_start() for row, gen in zip(rows, pending)],
                                  device=x.device)
            query = P + starts[:, None] + offsets
            logits = model(x, query_idx=query).logits
            tokens, p, conf = propose_tokens(logits, self.temperature, self.top_p, family, model)
            score = POSITION_SCORES["confidence"](p, tokens, conf)
            for r, gen in enumerate(pending):
                if gen is not None:
                    rows[r].take(tokens[r], score[r])
        for r, row in enumerate(rows):
            x[r, P:] = row.base
        self.last_calls = [row.calls for row in rows]
        return x, max(row.forwards for row in rows)


WINO_REF = "Hong et al. arXiv 2507.18578 (Feng-Hong/WINO-DLLM LLaDA/decoding.py)"
register_method("wino", WinoDecoder, method_type="remask", representative_param="threshold", uses_steps=False,
                position_score="confidence",
                summary="draft masked positions with confidence > threshold (capped), re-mask written tokens "
                        "whose probability fell below threshold_back",
                reference=WINO_REF)
register_method("saber", SaberDecoder, method_type="remask", representative_param="n", uses_steps=False,
                position_score="confidence",
                summary="commit positions above the mean commit confidence (at least n), re-mask the written "
                        "tokens whose confidence fell most",
                reference="Dong et al. arXiv 2510.18165 (zhaoyMa/Saber decoding.py)")
register_method("freedave", FreeDaveDecoder, method_type="adaptive", representative_param="draft_steps",
                uses_steps=False, position_score="confidence",
                summary="one-token-per-step greedy decoding computed as rounds of draft_steps drafts verified by "
                        "their own logits; same output, each draft a forward",
                reference="Wu and Zhang arXiv 2510.00294 (cychomatica/FreeDave generation/core.py)")
