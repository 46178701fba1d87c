"""The block-diffusion families' own default decoders (issue #30): `sdar` (SDAR and TraDo), `fastdllm_v2`
and `llada2`.

Each decodes the generation block by block (the run's block_length is the model's block size S, blocks
aligned at the generation start), one counted forward per step, rows of a batch independently. The model
handle gives each query position the logits that predict its token (a shifted family's shift is done by
the handle), under the block-causal mask.

Followed upstream code:
- sdar: JetAstra/SDAR generate.py block_diffusion_generate, remasking "low_confidence_dynamic", with the
  confidence of SDAR's evaluation harness (evaluation/opencompass/opencompass/models/huggingface_bd3.py):
  the drawn token's probability under softmax(logits / temperature), before top-k / top-p. TraDo
  (Gen-Verse/dLLM-RL generate.py) uses the same function.
- fastdllm_v2: NVlabs/Fast-dLLM v2/generation_functions.py batch_sample and the checkpoint's
  Fast_dLLM_QwenForCausalLM.generate: the block's first token is the argmax of the previous position's
  logits; then sub-blocks in order, each step committing the sub-block's masks whose confidence is above
  the threshold plus the most confident one.
- llada2: LLaDA2MoeModelLM.generate of the inclusionAI LLaDA2.0 checkpoints: SDAR's dynamic rule with the
  confidence of the drawn token under the filtered (temperature, top-k, top-p) distribution, greedy at
  temperature 0.

Tokens are drawn with one torch.multinomial call over the batch's query rows (the upstream functions
decode one prompt at a time, so a batch of one draws exactly as they do). A draw may give the mask id, as
the authors' draws do (the position stays masked); the padded logit columns are never drawn, and greedy
choices never take the mask id (`choosable`).
"""
import torch
import torch.nn.functional as F

from .decoders import BlockDecoder, Range, choosable, register_method, top_k_commit


def top_k_filter(logits, top_k):
    """Logits below the k-th largest of their row set to -inf (top_k 0 or None: unchanged)."""
    if not top_k:
        return logits
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -torch.inf)


def top_p_filter(logits, top_p):
    """Nucleus filter as the block-diffusion upstreams write it: in descending order, a token is dropped
    when the mass up to and including the token before it exceeds top_p (the best token always stays)."""
    if top_p is None or top_p >= 1:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    mass = ordered.softmax(-1).cumsum(-1)
    drop = F.pad(mass[..., :-1] > top_p, (1, 0), value=False)
    return logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)


def draw(probs, model):
    """One multinomial draw per row of `probs` [B, Q, V] (float32), never a padded logit column beyond
    the tokenizer. The mask id can be drawn, as the authors' functions draw it: a position committed
    to it stays masked and is decoded again at a later step."""
    padded = torch.arange(probs.shape[-1], device=probs.device) >= getattr(model, "n_tokens", probs.shape[-1])
    flat = probs.masked_fill(padded, 0.0).flatten(0, -2)
    return torch.multinomial(flat, 1).view(probs.shape[:-1])


def nucleus_probs(probs, top_p):
    """Fast-dLLM v2's top-p on probabilities: in descending order, drop a token when the mass up to and
    including the token before it exceeds top_p, then renormalise."""
    if top_p is None or top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    drop = F.pad(ordered.cumsum(-1)[..., :-1] > top_p, (1, 0), value=False)
    kept = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return kept / kept.sum(-1, keepdim=True)


def greedy(logits, model):
    return choosable(logits, model).argmax(-1)


def gathered(probs, tokens):
    return probs.gather(-1, tokens[..., None]).squeeze(-1)


def dynamic_commit(conf, candidates, k, threshold):
    """SDAR's low_confidence_dynamic rule: every candidate whose confidence is above the threshold when
    there are at least k of them, else the k most confident."""
    high = candidates & (conf > threshold)
    enough = high.sum(1) >= k
    return torch.where(enough[:, None], high, top_k_commit(conf.to(torch.float64), candidates, k))


class DynamicThresholdDecoder(BlockDecoder):
    """Per step of the current block: propose a token per position, then `dynamic_commit` with the
    block's uniform schedule count k (steps // blocks steps per block). A subclass sets `propose`."""
    method_type = "threshold"
    representative_param = "threshold"
    position_score = "confidence"
    ranges = {"temperature": Range(0), "top_p": Range(0, 1, open_low=True), "top_k": Range(0),
              "threshold": Range(0, 1)}

    def __init__(self, mask_id, temperature=1.0, top_p=1.0, top_k=0, threshold=0.9):
        super().__init__(mask_id, temperature, top_p)
        self.top_k, self.threshold = int(top_k), float(threshold)

    def info(self, gen_length, steps, block_length):
        return dict(steps_per_block=steps // (gen_length // block_length), threshold=self.threshold)

    def select(self, logits, candidates, k, step, batch):
        tokens, conf = self.propose(logits, batch)
        return dynamic_commit(conf, candidates, k, self.threshold), tokens


class SdarDecoder(DynamicThresholdDecoder):
    """SDAR / TraDo low_confidence_dynamic. Temperature 0 (or top_k 1) is greedy; otherwise a token is
    drawn from softmax of the temperature-scaled, top-k and top-p filtered logits. The confidence is the
    token's probability under softmax(logits / temperature) (1 for temperature 0), as SDAR's evaluation
    harness reads it."""
    summary = "SDAR/TraDo: per block, commit masks with confidence > threshold if at least k, else the top k"

    def propose(self, logits, batch):
        scaled = logits / self.temperature if self.temperature > 0 else logits
        probs = scaled.softmax(-1)
        if self.temperature == 0 or self.top_k == 1:
            tokens = greedy(scaled, batch.model)
        else:
            filtered = top_p_filter(top_k_filter(scaled, self.top_k), self.top_p)
            tokens = draw(filtered.softmax(-1), batch.model)
        return tokens, gathered(probs, tokens)


class Llada2Decoder(DynamicThresholdDecoder):
    """LLaDA2.0's generate: temperature 0 is greedy with the softmax probability as confidence; otherwise
    the token is drawn from, and its confidence read under, the temperature-scaled, top-k and top-p
    filtered distribution."""
    summary = "LLaDA2.0: per block, commit masks with confidence > threshold if at least k, else the top k"

    def __init__(self, mask_id, temperature=0.0, top_p=None, top_k=None, threshold=0.95):
        super().__init__(mask_id, temperature, 1.0 if top_p is None else top_p, top_k or 0, threshold)

    def propose(self, logits, batch):
        if self.temperature == 0:
            probs = logits.softmax(-1)
            tokens = greedy(logits, batch.model)
            return tokens, gathered(probs, tokens)
        filtered = top_p_filter(top_k_filter(logits / self.temperature, self.top_k), self.top_p)
        probs = filtered.softmax(-1)
        tokens = draw(probs, batch.model)
        return tokens, gathered(probs, tokens)


class FastDllmV2Decoder(BlockDecoder):
    """Fast-dLLM v2. A block's first token is the argmax of its logits alone (one forward; upstream reads
    it from the forward that stores the previous block). Then the block is decoded in sub-blocks of
    `sub_block` positions in order: per step, the current sub-block's masks with confidence above
    `threshold`, and always the most confident one. Temperature 0 is greedy with the softmax
    probability as confidence; otherwise the token is drawn from the temperature-scaled top-p
    renormalised distribution and its confidence read there. `steps` is not used."""
    method_type = "threshold"
    representative_param = "threshold"
    position_score = "confidence"
    summary = "Fast-dLLM v2: first token of a block by argmax, then per sub-block: confidence > threshold, at least the best"
    ranges = {"temperature": Range(0), "top_p": Range(0, 1, open_low=True), "threshold": Range(0, 1),
              "sub_block": Range(1)}

    def __init__(self, mask_id, temperature=0.0, top_p=0.95, threshold=0.9, sub_block=8):
        super().__init__(mask_id, temperature, top_p)
        self.threshold, self.sub_block = float(threshold), int(sub_block)

    def info(self, gen_length, steps, block_length):
        if block_length % self.sub_block:
            raise ValueError(f"fastdllm_v2: block_length {block_length} is not a multiple of sub_block {self.sub_block}")
        return dict(sub_block=self.sub_block, threshold=self.threshold)

    def sub_block_choice(self, part, batch):
        """(tokens, confidence) [R, sub_block] for the rows' current sub-blocks `part` [R, sub_block, V]."""
        if self.temperature == 0:
            probs = part.softmax(-1)
            tokens = greedy(part, batch.model)
        else:
            probs = nucleus_probs((part / self.temperature).softmax(-1), self.top_p)
            tokens = draw(probs, batch.model)
        return tokens, gathered(probs, tokens)

    def select(self, logits, candidates, k, step, batch):
        first = candidates[:, 0]
        tokens = greedy(logits, batch.model)
        commit = torch.zeros_like(candidates)
        commit[:, 0] = first
        rows = candidates.any(1) & ~first
        if rows.any():
            width = self.sub_block
            start = candidates[rows].float().argmax(1).long() // width * width
            index = start[:, None] + torch.arange(width, device=logits.device)
            part = logits[rows].gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
            drawn, conf = self.sub_block_choice(part, batch)
            open_ = candidates[rows].gather(1, index)
            ones = torch.ones(len(index), dtype=torch.long, device=logits.device)
            best = top_k_commit(conf.to(torch.float64), open_, ones)
            chosen = best | (open_ & (conf > self.threshold))
            commit[rows] = torch.zeros_like(candidates[rows]).scatter(1, index, chosen)
            tokens[rows] = tokens[rows].scatter(1, index, drawn)
        return commit, tokens


register_method("sdar", SdarDecoder, uses_steps=True,
                reference="JetAstra/SDAR generate.py block_diffusion_generate (low_confidence_dynamic); "
                          "evaluation/opencompass/opencompass/models/huggingface_bd3.py; Gen-Verse/dLLM-RL generate.py")
register_method("llada2", Llada2Decoder, uses_steps=True,
                reference="inclusionAI LLaDA2.0 modeling_llada2_moe.py LLaDA2MoeModelLM.generate")
register_method("fastdllm_v2", FastDllmV2Decoder, uses_steps=False,
                reference="NVlabs/Fast-dLLM v2/generation_functions.py batch_sample; Fast_dLLM_v2_7B modeling.py generate")
