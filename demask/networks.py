"""Native LLaDA-8B and Dream-7B in plain PyTorch (in the manner of nanoGPT's model.py), the fast
GPU forward, the forwards of --cache, and checkpoint + tokenizer loading (LLaDA-MoE's network is in
moe.py and loads through here).

Parameter names are those of the official checkpoints (GSAI-ML/LLaDA-8B-Instruct's
modeling_llada.py, Dream-org/Dream-v0-Instruct-7B's modeling_dream.py), so a plain
load_state_dict loads them; attention is bidirectional SDPA with RoPE, RMSNorm and SwiGLU.
"""
import json
import os
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Layers shared by both families

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(positions, rope_dim, theta):
    """cos/sin [B, 1, T, rope_dim] in fp32 for the rotate-half RoPE form (rope_dim: the rotated part
    of a head, all of it but for a partial rotary factor)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, device=positions.device, dtype=torch.float32) / rope_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """RoPE on the first cos.shape[-1] features of each head; the others pass unchanged."""
    if cos.shape[-1] < x.shape[-1]:
        rotated, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
        return torch.cat([apply_rotary(rotated, cos, sin), rest], dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attention(q, k, v, n_heads, n_kv_heads, rope, key_mask, kv=None):
    """Bidirectional multi-head attention; key_mask [B, 1, 1, T] (True = attend) or None. Returns the
    output and the keys and values attended to, after RoPE and before the grouped-query repeat.
    `kv` = (keys, values, rows, computed) for a forward of some positions (cached_forward): the new
    keys and values of the positions `computed` [B, Q] replace, in a copy, the cached ones ([R, kv
    heads, T, head_dim]) of the batch rows `rows` [B]."""
    B, T, _ = q.shape
    q = q.view(B, T, n_heads, -1).transpose(1, 2)
    k = k.view(B, T, n_kv_heads, -1).transpose(1, 2)
    v = v.view(B, T, n_kv_heads, -1).transpose(1, 2)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    if kv is not None:
        keys, values, rows, computed = kv
        index = computed[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        k, v = keys[rows].scatter(2, index, k), values[rows].scatter(2, index, v)
    attended = k, v
    if n_kv_heads != n_heads:
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
    return out.transpose(1, 2).reshape(B, T, -1), *attended


# ---------------------------------------------------------------------------
# LLaDA and Dream

class LLaDABlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hidden = c["d_model"], c["mlp_hidden_size"]
        self.n_heads, self.n_kv_heads = c["n_heads"], c.get("n_kv_heads") or c["n_heads"]
        kv = d // self.n_heads * self.n_kv_heads
        self.attn_norm, self.ff_norm = RMSNorm(d, c["rms_norm_eps"]), RMSNorm(d, c["rms_norm_eps"])
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, False), nn.Linear(d, kv, False), nn.Linear(d, kv, False)
        self.attn_out = nn.Linear(d, d, False)
        self.ff_proj, self.up_proj, self.ff_out = nn.Linear(d, hidden, False), nn.Linear(d, hidden, False), nn.Linear(hidden, d, False)

    def forward(self, h, rope, key_mask, kv=None):
        """(output, keys, values): see attention."""
        a = self.attn_norm(h)
        out, k, v = attention(self.q_proj(a), self.k_proj(a), self.v_proj(a), self.n_heads, self.n_kv_heads, rope,
                              key_mask, kv)
        h = h + self.attn_out(out)
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m)), k, v


class LLaDA(nn.Module):
    """LLaDA-8B layout: model.transformer.{wte, blocks.i, ln_f, ff_out}; row i predicts token i."""
    shift = 0

    def __init__(self, c):
        super().__init__()
        self.config, self.head_dim, self.theta = c, c["d_model"] // c["n_heads"], c["rope_theta"]
        self.rope_dim = self.head_dim
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c["embedding_size"] or c["vocab_size"], c["d_model"]),
            blocks=nn.ModuleList(LLaDABlock(c) for _ in range(c["n_layers"])),
            ln_f=RMSNorm(c["d_model"], c["rms_norm_eps"]),
            ff_out=nn.Linear(c["d_model"], c["embedding_size"] or c["vocab_size"], bias=False)))

    def parts(self):
        t = self.model.transformer
        return t.wte, t.blocks, t.ln_f, t.ff_out


class DreamAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.n_heads, self.n_kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        kv = d // self.n_heads * self.n_kv_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, a, rope, key_mask, kv=None):
        out, k, v = attention(self.q_proj(a), self.k_proj(a), self.v_proj(a), self.n_heads, self.n_kv_heads, rope,
                              key_mask, kv)
        return self.o_proj(out), k, v


class DreamMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hidden = c["hidden_size"], c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, m):
        return self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class DreamBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn, self.mlp = DreamAttention(c), DreamMLP(c)

    def forward(self, h, rope, key_mask, kv=None):
        """(output, keys, values): see attention."""
        a, k, v = self.self_attn(self.input_layernorm(h), rope, key_mask, kv)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Dream(nn.Module):
    """Dream-7B layout (Qwen2 names); row i of the network predicts token i + 1."""
    shift = 1

    def __init__(self, c):
        super().__init__()
        self.config, self.theta = c, c["rope_theta"]
        self.head_dim = c["hidden_size"] // c["num_attention_heads"]
        self.rope_dim = self.head_dim
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(DreamBlock(c) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def parts(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head


# ---------------------------------------------------------------------------
# The forward: plain on CPU, compiled blocks replayed as CUDA graphs on a GPU

def forward_logits(net, x, positions, key_mask, query_idx, blocks=None):
    """Logits [B, Q, V] aligned so that row j predicts token query_idx[:, j] (Dream's shift inside).
    `blocks`: callables that replace the net's blocks (compiled ones)."""
    embed, net_blocks, _, _ = net.parts()
    blocks = blocks or net_blocks
    rope = rotary_tables(positions, net.rope_dim, net.theta)
    h = embed(x)
    for block in blocks:
        h = block(h, rope, key_mask)[0]
    return head_logits(net, h, query_idx)


def head_logits(net, h, query_idx):
    """Logits [B, Q, V] for the tokens query_idx from the last hidden states h [B, T, d]."""
    _, _, norm, head = net.parts()
    rows = (query_idx - net.shift).clamp(min=0)
    return head(norm(h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))))


class GraphedForward:
    """CUDA-graph replay of a forward function, one graph per input shape (the `keep` most recent).

    Within a batch the shapes stay fixed for hundreds of forwards, so a capture (two forwards)
    pays off at once, and replay removes the kernel-launch gaps that a per-step host sync
    otherwise leaves on the GPU. All graphs share one memory pool; a graph's outputs (a tensor or
    a tuple of tensors) are only valid until the next replay, so they are returned as fresh copies
    (a single tensor, the logits, in fp32).
    The inputs at the positions `shared` (a KV cache) get no buffers of the graph's own: the graph
    reads the tensor it was captured with in place, and another tensor passed there is copied into
    that one (so it must be one its owner no longer uses: fast_forwards makes them per batch).
    """

    def __init__(self, forward, keep=4, shared=()):
        self.forward, self.keep, self.shared, self.graphs, self.pool = forward, keep, shared, {}, None

    def __call__(self, *inputs):
        key = tuple(None if t is None else tuple(t.shape) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs)
            if len(self.graphs) > self.keep:
                del self.graphs[next(iter(self.graphs))]
        graph, static, out = self.graphs.pop(key)
        self.graphs[key] = graph, static, out  # most recent last
        for buffer, value in zip(static, inputs):
            if buffer is not None and buffer is not value:
                buffer.copy_(value)
        graph.replay()
        if isinstance(out, tuple):
            return tuple(t.clone() for t in out)
        return out.float() if out.dtype != torch.float32 else out.clone()

    def capture(self, inputs):
        static = [t if i in self.shared or t is None else t.clone() for i, t in enumerate(inputs)]
        graph, out = self.record(static)
        return graph, static, out

    def record(self, static):
        """(graph, outputs) of the forward captured on the inputs `static`."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(*static)  # warm-up (and compilation) outside the graph
        torch.cuda.current_stream().wait_stream(side)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(*static)
        return graph, out


def eager_forwards(net):
    """The plain forwards (CPU, --eager): forward_logits, and a function that gives a batch's
    (refresh_forward, cached_forward) for --cache."""
    return partial(forward_logits, net), lambda: (partial(refresh_forward, net), partial(cached_forward, net))


def fast_forwards(net):
    """The GPU forwards: blocks compiled once for all layers and shapes (RMSNorm, RoPE and SwiGLU
    become fused kernels around the matmuls and SDPA), replayed as CUDA graphs per shape. The
    forwards of --cache are made per batch (batch_forwards) with graphs of their own: these read the
    batch's cache in place, so they live as long as the batch and never evict the exact forward's."""
    # a block compiles once per kind of call (with or without a cache, a key mask; batch of one or not)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    blocks = [torch.compile(block, dynamic=True) for block in net.parts()[1]]

    def batch_forwards():
        return (GraphedForward(partial(refresh_forward, net, blocks=blocks), keep=8),
                GraphedForward(partial(cached_forward, net, blocks=blocks), keep=8, shared=(4, 5, 6)))
    return GraphedForward(partial(forward_logits, net, blocks=blocks)), batch_forwards


def block_layers(net, device, graphed=True):
    """The layers a block-diffusion model's cache runs (blockcache.BlockCache): compiled on a GPU
    (no CUDA graphs: the window and cache widths change from call to call), else the net's own."""
    blocks = net.parts()[1]
    if device.type == "cuda" and graphed:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        return [torch.compile(block, dynamic=True) for block in blocks]
    return list(blocks)


def network_forwards(net, device, graphed=True):
    """(forward, cache_forwards): fast_forwards on a GPU (unless graphed=False), else eager_forwards."""
    return fast_forwards(net) if device.type == "cuda" and graphed else eager_forwards(net)


# ---------------------------------------------------------------------------
# The forwards of --cache (kvcache.py): a refresh that keeps every layer's keys and values, and a
# forward of some positions against them

class KVCache:
    """Of each of `n_rows` rows, as its last refresh left them: every layer's keys and values after
    RoPE and before the grouped-query repeat (keys, values [n_layers, n_rows, kv heads, T, head_dim])
    and the last hidden states before the final norm (hidden [n_rows, T, d]). Allocated at the first
    store; rows never stored hold zeros."""

    def __init__(self, n_rows):
        self.n_rows, self.keys, self.values, self.hidden = n_rows, None, None, None

    def store(self, rows, keys, values, hidden):
        """Keep a refresh_forward's keys, values and hidden states of the batch rows `rows`."""
        if self.keys is None:
            self.keys = keys.new_zeros((keys.shape[0], self.n_rows, *keys.shape[2:]))
            self.values = torch.zeros_like(self.keys)
            self.hidden = hidden.new_zeros((self.n_rows, *hidden.shape[1:]))
        self.keys[:, rows], self.values[:, rows], self.hidden[rows] = keys, values, hidden


def refresh_forward(net, x, positions, key_mask, query_idx, blocks=None):
    """forward_logits that also returns what a KVCache keeps: (logits [B, Q, V], keys and values
    [n_layers, B, kv heads, T, head_dim], last hidden states [B, T, d])."""
    embed, net_blocks, _, _ = net.parts()
    rope = rotary_tables(positions, net.rope_dim, net.theta)
    h, keys, values = embed(x), [], []
    for block in blocks or net_blocks:
        h, k, v = block(h, rope, key_mask)
        keys.append(k)
        values.append(v)
    return head_logits(net, h, query_idx), torch.stack(keys), torch.stack(values), h


def cached_forward(net, x, positions, key_mask, query_idx, keys, values, hidden, rows, computed, blocks=None):
    """Logits [r, Q, V] of the batch rows `rows` [r] (x, positions [r, T], key_mask [r, 1, 1, T] or
    None and query_idx are theirs) when only the positions `computed` [r, C] (a position may repeat)
    run through the layers, attending to the cached keys and values (KVCache's keys, values, hidden)
    of the others, whose last hidden states are the cached ones."""
    embed, net_blocks, _, _ = net.parts()
    x, positions = x.gather(1, computed), positions.gather(1, computed)
    rope = rotary_tables(positions, net.rope_dim, net.theta)
    h = embed(x)
    for i, block in enumerate(blocks or net_blocks):
        h = block(h, rope, key_mask, (keys[i], values[i], rows, computed))[0]
    h = hidden[rows].scatter(1, computed[..., None].expand(-1, -1, h.shape[-1]), h)
    return head_logits(net, h, query_idx)


# ---------------------------------------------------------------------------
# Checkpoints and tokenizers

MODEL_CLASSES = {"llada": LLaDA, "dream": Dream}  # the dense networks; network_class adds LLaDA-MoE's
# Architecture -> what decoders and prompts see (`family`): LLaDA-MoE decodes as LLaDA does (no shift,
# LLaDA's sampling); of the block-diffusion networks (blocknets.py, llada2.py) SDAR and LLaDA2.0 as
# LLaDA (row i predicts token i), Fast-dLLM v2 as Dream (row i predicts token i + 1).
FAMILIES = {"llada": "llada", "dream": "dream", "llada_moe": "llada",
            "sdar": "llada", "fast_dllm_qwen": "dream", "llada2_moe": "llada"}
BLOCK_ARCHITECTURES = ("sdar", "fast_dllm_qwen", "llada2_moe")


def network_class(architecture):
    """The network of an architecture; the other modules' networks build on this module's layers."""
    if architecture == "llada_moe":
        from .moe import LLaDAMoE
        return LLaDAMoE
    if architecture == "llada2_moe":
        from .llada2 import LLaDA2MoE
        return LLaDA2MoE
    if architecture in BLOCK_ARCHITECTURES:
        from .blocknets import BLOCK_ARCHITECTURES as BLOCK_NETWORKS
        return BLOCK_NETWORKS[architecture]
    return MODEL_CLASSES[architecture]


def model_architecture(config):
    """The network of a config.json: LLaDA-MoE's checkpoints say model_type "llada" (the official one)
    or "lladamoe" (dllm's copies) and are told from dense LLaDA by their experts."""
    kind = str(config.get("model_type", "")).lower()
    if kind in ("llada", "lladamoe") and "num_experts" in config:
        return "llada_moe"
    if kind not in FAMILIES:
        raise ValueError(f"unsupported model_type {config.get('model_type')!r} (expected LLaDA, LLaDA-MoE, Dream, "
                         "SDAR, Fast-dLLM v2 or LLaDA2.0)")
    return kind


def is_block_model(path_or_id):
    """Whether a model is a block-diffusion one: from its config.json when local or cached, else from
    the labels' hub checkpoints (None: not known before it loads)."""
    path = cached_model_path(path_or_id)
    if path is None:
        return BLOCK_CHECKPOINTS.get(path_or_id)
    try:
        return model_architecture(json.load(open(os.path.join(path, "config.json")))) in BLOCK_ARCHITECTURES
    except (OSError, ValueError):
        return None


def model_family(config):
    return FAMILIES[model_architecture(config)]


CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # what a hub checkpoint needs here
# Bytes of the weights of the hub checkpoints the labels use: their model.safetensors.index.json total_size
# where tests/fixtures/model_files has it, else bf16 bytes of the parameter shapes of the shipped config.json.
CHECKPOINT_BYTES = {"GSAI-ML/LLaDA-8B-Instruct": 16031162368, "Dream-org/Dream-v0-Instruct-7B": 15231233024,
                    "GSAI-ML/LLaDA-1.5": 16031162368, "GSAI-ML/LLaDA-8B-Base": 16031162368,
                    "Dream-org/Dream-Coder-v0-Instruct-7B": 15231233024, "apple/DiffuCoder-7B-Instruct": 15231233024,
                    "inclusionAI/LLaDA-MoE-7B-A1B-Instruct": 14713761792,
                    # block diffusion: SDAR-4B-Chat's and Fast_dLLM_v2_7B's index; TraDo-4B-Instruct is SDAR-4B-Chat
                    # trained further (same shapes); LLaDA2.0-mini: bf16 bytes of its (reconstructed) config's shapes
                    "JetAstra/SDAR-4B-Chat": 8822848512, "Gen-Verse/TraDo-4B-Instruct": 8822848512,
                    "Efficient-Large-Model/Fast_dLLM_v2_7B": 15231233024, "inclusionAI/LLaDA2.0-mini": 32511277056}
BLOCK_CHECKPOINTS = {}  # hub id -> True for the block-diffusion labels' checkpoints (filled with the labels)


def cached_model_path(path_or_id):
    """The local folder of a model: the folder itself, or the hub id's snapshot already in the local
    cache; None when the hub id is not cached (nothing is downloaded here)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_id, allow_patterns=CHECKPOINT_FILES, local_files_only=True)
    except Exception:  # not cached (or a broken cache entry): the caller decides what to say
        return None


def weight_bytes(path_or_id):
    """Bytes of a model's weights: its safetensors files if local or cached, else the known size of a
    label's hub checkpoint, else None."""
    path = cached_model_path(path_or_id)
    if path is None:
        return CHECKPOINT_BYTES.get(path_or_id)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return json.load(open(index)).get("metadata", {}).get("total_size")
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
    return sum(os.path.getsize(f) for f in files) or None


def resolve_model_path(path_or_id):
    """A local folder as is; anything else is a hub id, downloaded once (weights, config, tokenizer)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_id, allow_patterns=CHECKPOINT_FILES)


def load_state(path, device, dtype):
    """Tensors of all safetensors shards, under their original names, straight onto the device."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(dtype)
    return state


def has_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))


# The prompt of a checkpoint that ships no chat template (LLaDA-8B-Base): BOS, then each message's text
# trimmed, a blank line after each. The harness's own plain form, not taken from any model's code.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] | trim }}\n\n{% endfor %}")


def load_tokenizer(path, family):
    """The checkpoint's tokenizer (Qwen2's class for Dream and for any Qwen-vocabulary checkpoint that ships
    vocab.json and merges.txt without tokenizer.json); PLAIN_TEMPLATE when it has no chat template."""
    import transformers
    qwen_files = not os.path.exists(os.path.join(path, "tokenizer.json")) and os.path.exists(os.path.join(path, "vocab.json"))
    cls = transformers.Qwen2Tokenizer if family == "dream" or qwen_files else transformers.PreTrainedTokenizerFast
    tokenizer = cls.from_pretrained(path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


# Mask ids the authors' generate functions pass where config.json names none and the tokenizer has no
# mask_token: LLaDA2.0's generate (mask_id=156895), Fast-dLLM v2's (its `|<MASK>|` token, 151665).
GENERATE_MASK_IDS = {"llada2_moe": 156895, "fast_dllm_qwen": 151665}


def mask_token_id(config, tokenizer):
    """config.json's mask_token_id, else the tokenizer's mask token (LLaDA-MoE's config.json has none),
    else the id the architecture's own generate function passes (GENERATE_MASK_IDS)."""
    if config.get("mask_token_id") is not None:
        return config["mask_token_id"]
    found = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if found is None and tokenizer is not None:  # Fast-dLLM v2 names it only as an added special token
        found = tokenizer.get_vocab().get("|<MASK>|")
    if found is None:
        found = GENERATE_MASK_IDS.get(model_architecture(config))
    if found is None:
        raise ValueError("config.json has no mask_token_id and the tokenizer names no mask token")
    return found


def tie_head(net, state, config):
    """A checkpoint with tied embeddings (config tie_word_embeddings / weight_tying) has no head
    weight: the head is the embedding matrix."""
    names = {id(p): n for n, p in net.named_parameters()}
    embed, _, _, head = net.parts()
    head_name = names[id(head.weight)]
    if head_name not in state and (config.get("tie_word_embeddings") or config.get("weight_tying")):
        state[head_name] = state[names[id(embed.weight)]]
    return state


def load_checkpoint(path_or_id, device=None, dtype=None):
    """LLaDA, LLaDA-MoE or Dream (architecture from config.json) with its tokenizer, in eval mode on
    `device` (default: cuda if available), bf16 on a GPU and fp32 on the CPU unless `dtype` says otherwise."""
    path = resolve_model_path(path_or_id)
    config = json.load(open(os.path.join(path, "config.json")))
    architecture = model_architecture(config)
    family = FAMILIES[architecture]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        net = network_class(architecture)(config)
    net.load_state_dict(tie_head(net, load_state(path, device, dtype), config), strict=True, assign=True)
    tokenizer = load_tokenizer(path, family) if has_tokenizer(path) else None
    return SimpleNamespace(net=net.eval(), family=family, architecture=architecture, tokenizer=tokenizer,
                           config=config, device=device, dtype=dtype)
