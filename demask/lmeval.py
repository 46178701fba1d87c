"""lm-evaluation-harness model `demask`: any registered decoder of this harness, run under its rule checks.

    python -m demask.lmeval --model demask --model_args model=models/tiny-llada,decoder=klass \
        --tasks demask_tiny_math --include_path configs/lm_eval_tasks --apply_chat_template

`python -m demask.lmeval` is lm-eval's own command line (lm_eval.__main__.cli_evaluate) after this
module is imported, which registers the model name `demask` (lm-eval's `--include_path` loads tasks,
not models). docs/lm-eval.md has the model_args table, what is counted and the equivalence checks.

- generate_until decodes through core.decode_batch (every forward counted and rule-checked) with the
  command line's batching: requests sorted by prompt length (stable), batches of batch_size, each
  batch seeded with seed + the request index of its first request. The generation length of a
  request is min(gen_length, max_gen_toks) rounded UP to whole blocks of block_length, with the
  model_args' steps per block. The generated ids are cut at the model's first stop id and decoded
  without special tokens (as the command line judges them), then cut at the first `until` string.
- loglikelihood is LLaDA's Monte Carlo estimate (GSAI-ML/LLaDA eval_llada.py get_loglikelihood):
  mc_num masked copies, mc_batch a forward, masking ratios stratified over 1..len(target), the
  masked tokens' cross-entropy divided by the ratio, averaged.
- loglikelihood_rolling is not implemented.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api import registry

from . import REPO
from .core import cut_at_stop, decode_batch, load_model, torch_state
from .settings import CACHE_MODES

SAMPLES_FILE = "demask_samples.jsonl"
OUTPUT_ENV = "DEMASK_LMEVAL_OUTPUT"  # set by `python -m demask.lmeval` from --output_path


def entry():
    """The entry script (custom_demask_eval): the editable decoder, resolve() and the fingerprints live
    there. Imported here only, inside functions, so that importing the package never runs it."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import custom_demask_eval
    return custom_demask_eval


class DemaskText(str):
    """A generation as lm-eval sees it (a str) that also carries its counted forwards, so that a task's
    process_results can report them (configs/lm_eval_tasks: avg_steps)."""
    forwards = None
    record = None


def parse_decoder_args(text):
    """`k=v;k=v` (values as JSON when they parse, else strings) -> dict; a dict passes through."""
    if isinstance(text, dict):
        return dict(text)
    out = {}
    for item in filter(None, (t.strip() for t in str(text or "").split(";"))):
        if "=" not in item:
            raise ValueError(f"decoder_args expects k=v;k=v, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = entry().parse_value(value)
    return out


def generation_length(gen_length, block_length, max_gen_toks=None):
    """min(gen_length, max_gen_toks) rounded up to whole blocks."""
    wanted = gen_length if max_gen_toks is None else min(gen_length, int(max_gen_toks))
    return max(1, -(-wanted // block_length)) * block_length


def flag(value):
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


class DemaskLM(LM):
    """model_args: model, decoder, decoder_args, gen_length, steps, block_length, temperature, top_p,
    conf_threshold, kl_threshold, history_length, batch_size, cache, seed, apply_chat_template,
    device, threads, mc_num, mc_batch, check_greedy, samples_path (docs/lm-eval.md)."""

    def __init__(self, model=None, pretrained=None, decoder="default", decoder_args="", gen_length=None, steps=None,
                 block_length=None, temperature=0.0, top_p=None, conf_threshold=0.9, kl_threshold=0.01,
                 history_length=2, batch_size=None, cache="none", seed=1234, apply_chat_template=False, device=None,
                 threads=None, mc_num=128, mc_batch=32, check_greedy=False, samples_path=None, max_batch_size=None,
                 dtype=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"demask: unknown model_args {sorted(unknown)} (docs/lm-eval.md lists them)")
        cde = entry()
        model = model or pretrained
        if not model:
            raise ValueError("demask: give model=<local folder or hub id> in --model_args")
        gen_length = int(gen_length or 256)
        block_length = int(block_length or gen_length)
        steps = int(steps or gen_length)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # as lm-eval's HFLM: lm-eval splits the documents by rank and gathers through this
            import accelerate
            self.accelerator = accelerate.Accelerator()
            self._rank, self._world_size = self.accelerator.local_process_index, self.accelerator.num_processes
            device = f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = device
        on_cpu = not (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if threads:
            torch.set_num_threads(int(threads))
        elif on_cpu and not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(1)  # as the command line: the tiny model is fastest on one thread
        settings = cde.RunSettings(
            model=str(model), task="math", label="lm-eval", gen_length=gen_length, steps=steps,
            block_length=block_length, temperature=float(temperature),
            top_p=None if top_p in (None, "", "none", "None") else float(top_p),
            conf_threshold=float(conf_threshold), kl_threshold=float(kl_threshold),
            history_length=int(history_length), batch_size=int(batch_size) if batch_size else None,
            decoder=str(decoder), decoder_args=parse_decoder_args(decoder_args), seed=int(seed),
            device=device, cache=str(cache or "none"))
        if settings.cache not in CACHE_MODES:
            raise ValueError(f"demask: cache={cache!r}: one of none, prefix, dual")
        try:
            self.run = cde.resolve(settings)
        except SystemExit as e:  # resolve() reports a bad setting on stderr and exits: a plain error here
            raise ValueError("demask: the model_args above were refused (see the error line)") from e
        self.lm = load_model(self.run.model, device=device)
        self.tokenizer = self.lm.tokenizer
        self.chat = flag(apply_chat_template)
        self.mc_num, self.mc_batch, self.check_greedy = int(mc_num), int(mc_batch), flag(check_greedy)
        if self.mc_num % self.mc_batch:
            raise ValueError(f"demask: mc_num {self.mc_num} is not a multiple of mc_batch {self.mc_batch}")
        self.samples_path = samples_path
        self._demask_records = []

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args win over lm-eval's --batch_size/--device (which lm-eval always passes: its
        --batch_size defaults to 1, its --device to cuda:0); --batch_size auto means the harness's
        default, and lm-eval's cuda device on a machine without CUDA the CPU."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("batch_size", "")).startswith("auto"):
            extra.pop("batch_size")
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra.pop("device")  # lm-eval's default device is cuda:0: without CUDA, the CPU
        return cls(**arg_dict, **extra)

    # -- data parallel (lm-eval splits the documents by rank and gathers through these), as HFLM

    def all_gather(self, tensor):
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self):
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    # -- what lm-eval asks of a chat model

    @property
    def tokenizer_name(self):
        return str(self.run.model).replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None)

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def max_length(self):
        return self.run.gen_length

    def get_model_info(self):
        """{"demask": ...}, which lm-eval merges into results["config"]: the resolved settings, the
        decoder fingerprint, the environment and the counted forwards of this process."""
        cde = entry()
        forwards = [r["forwards"] for r in self._demask_records]
        return {"demask": dict(decoder=self.run.decoder, decoder_fingerprint=self.run.decoder_fingerprint,
                    fingerprint=self.run.fingerprint, decoder_info=self.run.decoder_info, settings=self.run.to_json(),
                    environment=cde.environment(self.lm.dtype), n_generations=len(forwards),
                    avg_forwards=sum(forwards) / len(forwards) if forwards else None,
                    samples_file=self.sidecar_path())}

    # -- generation

    def encode_context(self, context):
        """The prompt ids of a context: a context already rendered with the chat template (lm-eval's
        --apply_chat_template, or apply_chat_template=true here) is tokenized as is, like the command
        line's prompts; a raw context gets LLaDA's BOS in front unless it starts with it."""
        tok = self.tokenizer
        if self.chat:
            context = self.apply_chat_template([{"role": "user", "content": context}])
        bos = tok.bos_token
        if self.lm.family == "llada" and bos and not context.startswith(bos):
            return [tok.bos_token_id] + tok(context, add_special_tokens=False).input_ids
        return tok(context, add_special_tokens=False).input_ids

    def run_for(self, gen):
        """The run settings of one generation length: steps per block as in model_args."""
        if gen == self.run.gen_length:
            return self.run
        return self.run.replace(gen_length=gen, steps=self.run.steps_per_block * (gen // self.run.block_length))

    def generate_until(self, requests, disable_tqdm=False):
        from tqdm import tqdm
        cde = entry()
        items = []
        for index, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen = generation_length(self.run.gen_length, self.run.block_length, kwargs.get("max_gen_toks"))
            items.append(dict(id=f"request/{index}", index=index, prompt_ids=self.encode_context(context), until=until,
                              gen=gen, doc_id=getattr(req, "doc_id", None), task=getattr(req, "task_name", None),
                              args=(context, kwargs)))
        out = [None] * len(items)
        bar = tqdm(total=len(items), desc="demask", disable=disable_tqdm or self.rank > 0, file=sys.stderr)
        for gen in sorted({it["gen"] for it in items}):
            run = self.run_for(gen)
            decoder = cde.build_decoder(run.decoder, self.lm.mask_id, run, run.decoder_args)
            self.lm.renew_decoder_tokenizer()
            todo = sorted((it for it in items if it["gen"] == gen), key=lambda it: len(it["prompt_ids"]))
            batch_size = run.batch_size
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                seed = run.seed + batch[0]["index"]
                began = time.time()
                generations, counted, reported = decode_batch(run, self.lm, decoder, batch, seed)
                seconds = (time.time() - began) / len(batch)
                for it, ids, forwards, said in zip(batch, generations, counted, reported):
                    kept, stopped = cut_at_stop(ids, self.lm.stop_ids)
                    text = self.tokenizer.decode(kept, skip_special_tokens=True)
                    cuts = [text.find(u) for u in it["until"] if u and u in text]
                    text = text[:min(cuts)] if cuts else text
                    record = dict(request=it["index"], doc_id=it["doc_id"], task=it["task"], rank=self.rank,
                                  forwards=int(forwards), reported_steps=int(said), seed=seed,
                                  seconds=round(seconds, 4), tokens=len(kept),
                                  tokens_per_forward=round(len(kept) / forwards, 4) if forwards else None,
                                  gen_length=run.gen_length, steps=run.steps, stopped=stopped, generation=text)
                    result = DemaskText(text)
                    result.forwards, result.record = int(forwards), record
                    out[it["index"]] = result
                    self._demask_records.append(record)
                    self.cache_hook.add_partial("generate_until", it["args"], text)
                bar.update(len(batch))
        bar.close()
        self.write_sidecar(out)
        return out

    def sidecar_path(self):
        folder = self.samples_path or os.environ.get(OUTPUT_ENV)
        if not folder:
            return None
        if folder.endswith(".json"):  # lm-eval's --output_path may name a file: its folder then
            folder = os.path.dirname(folder) or "."
        name = SAMPLES_FILE if self.world_size == 1 else f"demask_samples.rank{self.rank}.jsonl"
        return os.path.join(folder, name)

    def write_sidecar(self, results):
        path = self.sidecar_path()
        if not path:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            for r in results:
                f.write(json.dumps(dict(r.record, decoder=self.run.decoder,
                                        decoder_fingerprint=self.run.decoder_fingerprint)) + "\n")

    # -- likelihoods

    def encode_pair(self, context, continuation):
        """As LLaDA's eval_llada.py: trailing spaces of the context move to the continuation; the
        continuation's ids are those of context + continuation after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self.tokenizer(context + continuation)["input_ids"]
        prefix = self.tokenizer(context)["input_ids"]
        return prefix, whole[len(prefix):]

    def forward_process(self, batch, prompt_len):
        """LLaDA's _forward_process: per row a number of masked target tokens, stratified over
        1..target_len from a random start, at random positions; returns (noisy batch, ratio per position)."""
        b, length = batch.shape
        target_len = length - prompt_len
        k = torch.randint(1, target_len + 1, ())
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b)).long()
        x = ((x - 1) % target_len) + 1
        is_mask = torch.arange(target_len).repeat(b, 1) < x.unsqueeze(1)
        for i in range(b):
            is_mask[i] = is_mask[i][torch.randperm(target_len)]
        is_mask = torch.cat((torch.zeros(b, prompt_len, dtype=torch.bool), is_mask), dim=1)
        noisy = torch.where(is_mask, self.lm.mask_id, batch)
        return noisy, (x / target_len).unsqueeze(1).repeat(1, length)

    @torch.no_grad()
    def mc_loglikelihood(self, prefix, target):
        """LLaDA's get_loglikelihood: -mean over mc_num / mc_batch forwards of
        sum(masked cross-entropy / ratio) / mc_batch. A block-diffusion model's blocks start at the
        target."""
        seq = torch.tensor([list(prefix) + list(target)]).repeat(self.mc_batch, 1)
        losses = []
        for _ in range(self.mc_num // self.mc_batch):
            noisy, ratio = self.forward_process(seq, len(prefix))
            masked = noisy == self.lm.mask_id
            logits = self.lm.logits(noisy.to(self.lm.device), None, prompt_width=len(prefix)).cpu()
            loss = F.cross_entropy(logits[masked], seq[masked], reduction="none") / ratio[masked]
            losses.append(float(loss.sum()) / self.mc_batch)
        return -sum(losses) / len(losses)

    @torch.no_grad()
    def greedy_suffix(self, prefix, target):
        """LLaDA's suffix_greedy_prediction: unmask the target one token a forward, most confident
        first, and say whether it comes out as the target."""
        seq = torch.tensor([list(prefix) + [self.lm.mask_id] * len(target)])
        for _ in range(len(target)):
            masked = seq == self.lm.mask_id
            logits = self.lm.logits(seq.to(self.lm.device), None, prompt_width=len(prefix)).cpu()[masked]
            x0 = logits.argmax(-1)
            confidence = torch.softmax(logits, -1).gather(-1, x0[:, None]).squeeze(-1)
            order = torch.sort(confidence, descending=True).indices
            x0[order[1:]] = self.lm.mask_id
            seq[masked] = x0
        return bool((seq[0, len(prefix):] == torch.tensor(target)).all())

    def loglikelihood(self, requests, disable_tqdm=False):
        """(Monte Carlo log-likelihood, greedy) per request; greedy is computed only with
        check_greedy=true (else False), as in LLaDA's eval. Request i is seeded with seed + i."""
        out = []
        for index, req in enumerate(requests):
            context, continuation = req.args
            prefix, target = self.encode_pair(context, continuation)
            if not target:
                raise ValueError(f"demask: empty continuation for request {index} (nothing to score)")
            with torch_state():
                torch.manual_seed(self.run.seed + index)
                ll = self.mc_loglikelihood(prefix, target)
            greedy = self.greedy_suffix(prefix, target) if self.check_greedy else False
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("demask: loglikelihood_rolling (perplexity tasks) is not implemented for masked "
                                  "diffusion LMs here; use generate_until or loglikelihood tasks")


if "demask" not in registry.MODEL_REGISTRY:  # importable twice (as __main__ and as demask.lmeval)
    registry.register_model("demask")(DemaskLM)


def output_path(argv):
    for i, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def main(argv=None):
    """lm-eval's command line with the model `demask` registered; the decoding records go to
    demask_samples.jsonl beside --output_path (lm-eval puts results["config"]["demask"], the
    model's get_model_info(), into the results itself)."""
    from lm_eval.__main__ import cli_evaluate
    argv = sys.argv[1:] if argv is None else list(argv)
    path = output_path(argv)
    if path:
        os.environ[OUTPUT_ENV] = path
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
