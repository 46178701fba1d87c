"""Train an unmasking policy with GRPO, the dLLM frozen (Jazbec et al., arXiv 2512.09106, adapted
from d1's diffu-GRPO, dllm-reasoning/d1).

    python scripts/train_policy.py --config configs/tiny_policy.json --out runs/tiny-policy
    python scripts/train_policy.py --config configs/tiny_policy.json --out runs/tiny-policy --resume
    torchrun --nproc_per_node 2 scripts/train_policy.py --config ...   # or: accelerate launch; gloo on CPU

One step: per process `prompts_per_step` training prompts, each decoded `num_generations` times by
the frozen dLLM with the policy choosing the positions (plus `expert_generations` Fast-dLLM
threshold rollouts per group when set; all rollouts of a step are one batch), judged by the task;
reward = correct *
((L - steps + 1) / L) ** alpha (`mult`; `add` is correct - alpha * steps / L, the paper's
ablation that was reward-hacked), advantage = reward - group mean (no std normalisation), then
`num_iterations` AdamW updates of the clipped-ratio objective (epsilon, beta = 0: no KL). A step
whose advantages are all 0 updates nothing. Checkpoints: OUT/checkpoint-N/ (policy, optimizer,
scheduler, step); --resume continues from the latest. Runs on cuda when there is a GPU; a run stops
after `max_minutes` (if set) with a checkpoint of the step it reached.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demask import REPO, policy  # noqa: E402
from demask.core import judge_batch, left_pad, load_model  # noqa: E402
from demask.settings import RunSettings  # noqa: E402
from demask.tasks import TASKS, encode_prompt  # noqa: E402

DEFAULTS = dict(model_path="models/tiny-llada", task="math", train_data="data/tiny_math_train.jsonl", gen_length=64,
                block_length=64, temperature=0.0, policy_type="dit_confidence", policy_hidden_dim=128,
                policy_feedforward_dim=512, policy_num_heads=2, policy_num_blocks=1, policy_time_embed_dim=128,
                policy_full_context=True, policy_smart_init=-2.0, sampling_mode="bernoulli",
                policy_temperature=1.0, reward_functions=["correctness_mult"], reward_weights=[1.0],
                alpha_compute_reward=1.0, num_generations=8, expert_generations=0, expert_threshold=0.9,
                prompts_per_step=2, num_iterations=2, epsilon=0.5, beta=0.0, learning_rate=3e-5,
                adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1, max_grad_norm=0.2, warmup_steps=100,
                max_steps=1000, max_minutes=None, save_steps=100, model_dtype=None, seed=123)
REWARDS = ("correctness_mult", "correctness_add")

# ---------------------------------------------------------------------------
# Configuration


def load_config(path):
    with open(path) as f:
        cfg = {**DEFAULTS, **json.load(f)}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}")
    if cfg["policy_type"] != "dit_confidence" or cfg["sampling_mode"] not in policy.SAMPLING_MODES:
        raise ValueError("policy_type is dit_confidence; sampling_mode is bernoulli, bernoulli-argmax or dpls")
    if not set(cfg["reward_functions"]) <= set(REWARDS) or len(cfg["reward_functions"]) != len(cfg["reward_weights"]):
        raise ValueError(f"reward_functions are {REWARDS}, one weight each")
    if cfg["expert_generations"] and cfg["sampling_mode"] == "dpls":
        raise ValueError("expert steering needs a Bernoulli sampling_mode (a threshold set has no pick order)")
    if cfg["beta"] != 0:
        raise ValueError("beta must be 0 (no KL term, as in the paper)")
    if cfg["model_dtype"] not in (None, "float32", "bfloat16") or not (cfg["max_minutes"] is None or cfg["max_minutes"] > 0):
        raise ValueError("model_dtype is null, float32 or bfloat16; max_minutes is null or > 0")
    return cfg


def policy_config(cfg):
    return policy.PolicyConfig(cfg["policy_type"], cfg["policy_hidden_dim"], cfg["policy_feedforward_dim"],
                               cfg["policy_num_heads"], cfg["policy_num_blocks"], cfg["policy_time_embed_dim"],
                               cfg["policy_full_context"], cfg["policy_smart_init"])

# ---------------------------------------------------------------------------
# Rewards and advantages


def reward(correct, steps, gen_length, alpha, form="correctness_mult"):
    """mult: correct * ((L - steps + 1) / L) ** alpha; add: correct - alpha * steps / L."""
    correct, steps = torch.as_tensor(correct, dtype=torch.float64), torch.as_tensor(steps, dtype=torch.float64)
    if form == "correctness_mult":
        return correct * ((gen_length - steps + 1) / gen_length) ** alpha
    return correct - alpha * steps / gen_length


def advantages(rewards, group):
    """reward - mean of its group (consecutive `group` rollouts), no std normalisation."""
    r = rewards.view(-1, group)
    return (r - r.mean(1, keepdim=True)).flatten()

# ---------------------------------------------------------------------------
# Rollouts


def rollout(cfg, lm, decoder, task, prompts):
    """Every rollout of a step as one batch, decoded under the rule checks as the harness does:
    prompt i's G = num_generations + expert_generations rows are i * G ... i * G + G - 1, the
    policy's first, then the expert's. Returns the stacked trace (every forward's record, the rows
    of all forwards concatenated; trace["row"] indexes the rows), the counted forwards, the
    correctness and the expert flag per row."""
    n, G = cfg["num_generations"], cfg["num_generations"] + cfg["expert_generations"]
    expert = torch.arange(G).repeat(len(prompts)) >= n
    samples = [s for s in prompts for _ in range(G)]
    run = RunSettings(gen_length=cfg["gen_length"], steps=cfg["gen_length"], block_length=cfg["block_length"])
    input_ids, prompt_mask = left_pad([s["prompt_ids"] for s in samples], lm.pad_id)
    gens, counted, records = policy.rollout(run, lm, decoder, input_ids, prompt_mask, [s["id"] for s in samples],
                                            expert.to(lm.device) if cfg["expert_generations"] else None,
                                            cfg["expert_threshold"])
    _, _, verdicts = judge_batch(lm, task, samples, gens)
    return stack_trace(records), torch.tensor(counted), torch.tensor([v["correct"] for v in verdicts]), expert


def stack_trace(records):
    """The per-forward records of all rows as one trace of the rows that still had masks, with
    trace["row"] the row of each record."""
    trace = {k: torch.cat([record[k] for record in records]) for k in records[0]}
    B = records[0]["active"].numel()
    trace["row"] = torch.arange(B, device=trace["active"].device).repeat(len(records))
    live = trace.pop("active")
    return {k: v[live] for k, v in trace.items()}


def collect(cfg, lm, decoder, task, prompts):
    """The step's rollouts with their rewards and advantages (group-major, see `rollout`)."""
    trace, steps, correct, expert = rollout(cfg, lm, decoder, task, prompts)
    r = sum(w * reward(correct, steps, cfg["gen_length"], cfg["alpha_compute_reward"], form)
            for form, w in zip(cfg["reward_functions"], cfg["reward_weights"]))
    G = cfg["num_generations"] + cfg["expert_generations"]
    return trace, r, advantages(r, G).to(lm.device), correct, steps, expert

# ---------------------------------------------------------------------------
# The GRPO objective


def grpo_loss(cfg, net, trace, adv):
    """Clipped-ratio objective over the recorded steps: per rollout the mean over its steps of
    min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), then the mean over rollouts (negated)."""
    logits = net(trace["conf"], trace["masked"], trace["t"]).double()
    logp = policy.action_logp(logits, trace["candidates"], trace["action"], cfg["sampling_mode"],
                              cfg["policy_temperature"], getattr(net, "module", net).stop.double())
    ratio = torch.exp(logp - trace["logp"])
    rows, a, eps = trace["row"], adv[trace["row"]], cfg["epsilon"]
    per_step = torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    zeros = torch.zeros(adv.numel(), dtype=torch.float64, device=adv.device)
    n = zeros.index_add(0, rows, torch.ones_like(per_step))
    return -(zeros.index_add(0, rows, per_step) / n.clamp(min=1)).mean()


def lr_lambda(cfg):
    def f(step):
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        progress = (step - cfg["warmup_steps"]) / max(1, cfg["max_steps"] * cfg["num_iterations"] - cfg["warmup_steps"])
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f

# ---------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(out):
    names = os.listdir(out) if os.path.isdir(out) else []
    steps = [int(n.split("-")[1]) for n in names if n.startswith("checkpoint-") and n.split("-")[1].isdigit()]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(out, step, net, optimizer, scheduler):
    folder = os.path.join(out, f"checkpoint-{step}")
    tmp = folder + ".tmp"
    policy.save_policy(net, tmp)
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()),
               os.path.join(tmp, "trainer_state.pt"))
    os.replace(tmp, folder)
    return folder


def load_checkpoint(folder, net, optimizer, scheduler):
    net.load_state_dict(policy.load_policy(folder).state_dict())
    state = torch.load(os.path.join(folder, "trainer_state.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]

# ---------------------------------------------------------------------------
# Training loop


def setup_distributed():
    """(rank, world, device): gloo processes under torchrun (or accelerate launch), each on
    cuda:LOCAL_RANK when there is a GPU, else on the CPU with one torch thread."""
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        return rank, world, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(1)
    return rank, world, torch.device("cpu")


def agreed(flag, world):
    """True when any process says so, so that the processes skip and stop together."""
    value = torch.tensor(float(flag))
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def load_frozen_model(cfg, device):
    """The dLLM in `model_dtype` (null: the harness's, bf16 on a GPU) with the plain forward: a
    rollout batch drops its finished rows forward by forward, and the harness's GPU forward would
    capture a CUDA graph for every new number of rows."""
    dtype = getattr(torch, cfg["model_dtype"]) if cfg["model_dtype"] else None
    return load_model(os.path.join(REPO, cfg["model_path"]), device=device, dtype=dtype, graphed=False)


def build(cfg, device):
    """The policy (initialised from the seed on the CPU, so alike on every device), AdamW and the
    warm-up + cosine schedule."""
    torch.manual_seed(cfg["seed"])
    net = policy.PolicyNet(policy_config(cfg)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg["learning_rate"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                                  weight_decay=cfg["weight_decay"])
    return net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def step_prompts(cfg, lm, data, step, rank, world):
    """This process's prompts of a step; seeds torch for the step's draws, so that a resumed run
    draws what the uninterrupted one would have."""
    seed = cfg["seed"] * 100003 + step * world + rank
    prompts = [dict(s, prompt_ids=encode_prompt(lm, s)) for s in random.Random(seed).sample(data, cfg["prompts_per_step"])]
    torch.manual_seed(seed)
    return prompts


def update(cfg, model, optimizer, scheduler, trace, adv):
    """`num_iterations` AdamW updates of the GRPO objective on one step's rollouts; the last loss."""
    for _ in range(cfg["num_iterations"]):
        loss = grpo_loss(cfg, model, trace, adv)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        optimizer.step()
        scheduler.step()
    return loss.item()


def step_metrics(step, r, correct, steps, expert):
    """Mean reward over all rollouts; accuracy and forwards of the policy's and of the expert's."""
    metrics = dict(step=step, reward=float(r.mean()), accuracy=float(correct[~expert].float().mean()),
                   mean_steps=float(steps[~expert].float().mean()))
    if expert.any():
        metrics.update(expert_accuracy=float(correct[expert].float().mean()),
                       expert_steps=float(steps[expert].float().mean()))
    return metrics


def open_run(cfg, out, net, optimizer, scheduler, rank, world):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if rank == 0 and not latest_checkpoint(out):
        save_checkpoint(out, 0, net, optimizer, scheduler)
    if world > 1:
        dist.barrier()


def train(cfg, out, resume=False):
    """Run GRPO until max_steps, or until `max_minutes` have passed since the call (the step
    reached is then checkpointed and --resume continues it on the same schedule); returns the
    last step's metrics. Prompts and sampling are seeded per step and process, so a resumed run
    draws what the uninterrupted one would have."""
    from tqdm import tqdm
    started = time.time()
    rank, world, device = setup_distributed()
    lm = load_frozen_model(cfg, device)
    task = TASKS[cfg["task"]]()
    data = task.load(RunSettings(data=cfg["train_data"]))
    net, optimizer, scheduler = build(cfg, device)
    step = load_checkpoint(latest_checkpoint(out), net, optimizer, scheduler) if resume and latest_checkpoint(out) else 0
    # the STOP logit gets no gradient outside dpls
    model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True) if world > 1 else net
    open_run(cfg, out, net, optimizer, scheduler, rank, world)
    decoder = policy.PolicyDecoder.from_network(lm.mask_id, net, cfg["temperature"], sampling_mode=cfg["sampling_mode"],
                                                policy_temperature=cfg["policy_temperature"])
    end, first, skipped, metrics = cfg["max_steps"], step, 0, {}
    bar = tqdm(total=end, initial=step, disable=rank != 0, desc="grpo")
    log = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None
    while step < end:
        step_started = time.time()
        prompts = step_prompts(cfg, lm, data, step, rank, world)
        trace, r, adv, correct, steps, expert = collect(cfg, lm, decoder, task, prompts)
        live = agreed(bool((adv != 0).any()), world)
        loss = update(cfg, model, optimizer, scheduler, trace, adv) if live else 0.0
        skipped, step = skipped + (not live), step + 1
        out_of_time = agreed(cfg["max_minutes"] is not None and time.time() - started >= 60 * cfg["max_minutes"], world)
        metrics = dict(step_metrics(step, r, correct, steps, expert), loss=loss, lr=scheduler.get_last_lr()[0],
                       skipped_fraction=skipped / (step - first), seconds=round(time.time() - step_started, 2))
        if rank == 0:
            bar.update(1)
            bar.write("POLICY_METRICS: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in metrics.items()))
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if step % cfg["save_steps"] == 0 or step == end or out_of_time:
                save_checkpoint(out, step, net, optimizer, scheduler)
        if out_of_time:
            bar.write(f"POLICY_STOP: max_minutes={cfg['max_minutes']} reached after step {step} of {end}; "
                      f"checkpoint-{step} saved (--resume continues)")
            break
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint-N in --out")
    p.add_argument("--max_steps", type=int, help="override the config's max_steps")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.max_steps:
        cfg["max_steps"] = args.max_steps
    train(cfg, args.out, args.resume)


if __name__ == "__main__":
    main()
