"""A run's settings as one typed, frozen record: from a label row, the command line or a config.json.

`RunSettings.replace(**changes)` makes the variants of sweeps, seeds and resume; `to_json` is what a
run directory's config.json holds (and `from_json` reads it back). Its field order is that file's
key order. `cache` is left out of the JSON of an exact run, so exact runs keep the configuration,
fingerprint and run names they had before `--cache` existed.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

# The run settings a decoder's constructor may take by name (besides mask_id and its own arguments).
DECODER_SETTINGS = ("temperature", "top_p", "conf_threshold", "kl_threshold", "history_length")
# Settings a run may override from the command line or a sweep, with their types (and that identify a run).
RUN_KEYS = {"model": str, "task": str, "data": str, "gen_length": int, "steps": int, "block_length": int,
            "temperature": float, "top_p": float, "conf_threshold": float, "kl_threshold": float,
            "history_length": int, "scorer": str}
CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class RunSettings:
    model: str = ""
    task: str = "math"
    data: str = ""
    gen_length: int = 64
    steps: int = 64
    block_length: int = 32
    temperature: float = 0.0
    top_p: Optional[float] = None
    conf_threshold: float = 0.9
    kl_threshold: float = 0.01
    history_length: int = 2
    scorer: Optional[str] = None
    batch_size: Optional[int] = None  # None in a label row: 8 on a GPU for batched decoders, else 1
    limit: Optional[int] = None       # None: every sample
    label: str = ""
    decoder: str = "default"
    decoder_args: dict = field(default_factory=dict)
    seed: int = 1234
    device: Optional[str] = None
    cache: str = "none"
    plugins: tuple = ()
    sandbox: Optional[str] = None  # what confines generated code (tasks that run it), sandbox.layer_description()
    decoder_info: Optional[dict] = None
    decoder_fingerprint: Optional[str] = None  # the decoder's code and arguments (the report's grouping)
    fingerprint: Optional[str] = None          # all the code that ran and the decoder's fingerprint

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def n_blocks(self):
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self):
        return self.steps // self.n_blocks

    def decoder_settings(self):
        """The run settings a decoder's constructor may take by name, those that are set."""
        return {k: getattr(self, k) for k in DECODER_SETTINGS if getattr(self, k) is not None}

    def to_json(self):
        """config.json's dict: every field in order; `cache` only for a cached run."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "cache" and value == "none":
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data):
        """A RunSettings from config.json's dict; unknown keys are an error (ValueError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}")
        values = dict(data)
        values["plugins"] = tuple(values.get("plugins") or ())
        values["decoder_args"] = dict(values.get("decoder_args") or {})
        return cls(**values)

