"""The settings of a fine-tuning run: defaults, a TOML file, command-line flags.

Precedence: flags > ``--config run.toml`` > the defaults below. The defaults are
the main job: MiniLM-L6 fine-tuned on WordNet supersenses with layer-wise LR
decay, sized to finish within about ten minutes on two CPU cores. The choices
of strategy, optimizer, schedule and penalty are read from their owners.

>>> config = build_config(overrides={"lr": "3e-4", "strategy": "full"})
>>> config.lr, config.strategy
(0.0003, 'full')
>>> print(to_toml({"lr": 0.0003, "progress": False, "out": "runs/a"}), end="")
lr = 0.0003
progress = false
out = "runs/a"
"""
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields

from ..backend import DEVICES
from ..finetune.strategies import STRATEGIES
from ..nn import POOLINGS
from ..optim import OPTIMIZERS
from ..optim.regularization import PENALTIES as _PENALTY_KINDS
from ..optim.schedules import SCHEDULES


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


PENALTIES = ("none",) + tuple(_PENALTY_KINDS)  # "none": no penalty group keys at all


@dataclass
class RunConfig:
    """Every knob of ``tinysft finetune`` (each is also a flag: ``--max-length 48``)."""
    model: str = field(default="auto", metadata={"help": "model folder (config.json, model.safetensors, vocab.txt), "
                                                         "a Hugging Face name in the offline cache, or 'auto' (MiniLM-L6)"})
    data: str = field(default="wordnet", metadata={"help": "'wordnet' (supersenses) or a .csv / .jsonl with text,label"})
    max_examples: int = field(default=3000, metadata={"help": "stratified subsample of the dataset (0 = all)"})
    val_fraction: float = field(default=0.15, metadata={"help": "share of examples for validation"})
    test_fraction: float = field(default=0.15, metadata={"help": "share of examples for the test"})
    strategy: str = field(default="layerwise", metadata={"help": "one of " + ", ".join(STRATEGIES)})
    optimizer: str = field(default="adamw", metadata={"help": "one of " + ", ".join(OPTIMIZERS)})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of the top encoder layer"})
    head_lr: float = field(default=2e-3, metadata={"help": "learning rate of the new classification head"})
    decay: float = field(default=0.8, metadata={"help": "layer-wise decay: depth l gets lr·decay^l"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled (AdamW) or L2 (SGD/Adam) weight decay"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    schedule: str = field(default="linear", metadata={"help": "one of " + ", ".join(SCHEDULES)})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps spent warming up"})
    epochs: int = field(default=3, metadata={"help": "passes over the training split"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = no limit)"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step"})
    accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(default=40, metadata={"help": "tokens per example, [CLS] and [SEP] included"})
    clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 = off)"})
    penalty: str = field(default="none", metadata={"help": "one of " + ", ".join(PENALTIES)})
    penalty_lambda: float = field(default=0.0, metadata={"help": "strength λ of the penalty"})
    dropout: float = field(default=0.1, metadata={"help": "dropout before the head"})
    pooling: str = field(default="mean", metadata={"help": "one of " + ", ".join(POOLINGS)})
    patience: int = field(default=2, metadata={"help": "early stopping: epochs without improvement (0 = off)"})
    min_delta: float = field(default=0.0, metadata={"help": "early stopping: smallest improvement that counts"})
    gradual_unfreeze: bool = field(default=False, metadata={"help": "layerwise: start with the head alone and unfreeze "
                                                                     "one more layer group from the top each epoch"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every N steps (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed for splits, shuffling, dropout and the head"})
    device: str = field(default="cpu", metadata={"help": "one of " + ", ".join(DEVICES)})
    out: str = field(default="runs/latest", metadata={"help": "run folder for config, metrics, checkpoint, plots"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> "RunConfig":
        choices = {"strategy": STRATEGIES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "penalty": PENALTIES, "pooling": POOLINGS, "device": DEVICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        positive = ("lr", "batch_size", "accumulation", "max_length")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {self.decay}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set epochs or max_steps to a positive number")
        if not 0 < self.val_fraction + self.test_fraction < 1:
            raise ConfigError("val_fraction + test_fraction must be between 0 and 1")
        if self.batch_size % self.accumulation:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by accumulation {self.accumulation}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, kind, value):
    """``value`` as the field's type, or a ConfigError that names the field."""
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
    elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and not isinstance(value, bool):
        try:
            if float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError, OverflowError):
            pass
    elif isinstance(value, kind):
        return value
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"{name} must be {article} {kind.__name__}, got {value!r}")


def build_config(toml_path=None, overrides=None) -> RunConfig:
    """Defaults, then the TOML file's keys, then ``overrides`` (flags); validated."""
    settings = {}
    if toml_path is not None:
        try:
            with open(toml_path, "rb") as handle:
                settings.update(tomllib.load(handle))
        except FileNotFoundError:
            raise ConfigError(f"config file {toml_path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {toml_path} is not valid TOML: {error}") from None
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name: f.type for f in fields(RunConfig)}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return RunConfig(**{k: _coerce(k, known[k], v) for k, v in settings.items()}).validate()


def to_toml(settings: dict) -> str:
    """Flat ``key = value`` TOML for str, bool, int and float values (what RunConfig holds);
    ``build_config`` reads it back to the same settings."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        return repr(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in settings.items())
