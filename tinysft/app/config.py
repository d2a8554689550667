"""The settings of a command: one declarative table, read by the CLI flags and the TOML keys alike.

Each setting is a ``Setting``: its name, type, default, allowed range or choices
and a one-line meaning. A command declares its table once; the table gives the
command's flags (``add_flags``), reads a TOML file and the flags into a config
object (``build``, precedence: flags > ``--config run.toml`` > defaults) and
checks every value by type and range *before* the command creates anything.
A refused value raises ``ConfigError`` naming the setting, the value, where it
came from and what is allowed::

    lr = nan (--lr): allowed: a finite number > 0
    warmup_ratio = 1.5 (in run.toml): allowed: a number in [0, 1)

Floats are always finite (NaN and ±inf are refused). Checks that involve
several settings (``batch_size`` divisible by ``accumulation``) are functions
``config -> message or None`` in the table's ``checks``.

How a command declares its settings (a sketch of a command of its own; a
setting shared with ``finetune`` is taken from ``FINETUNE`` and, if needed,
given another default with ``dataclasses.replace``)::

    SFT = Settings("sft", [
        Setting("lora_r", int, 8, "LoRA rank r", minimum=1),
        Setting("lora_alpha", float, 16.0, "LoRA scale: ΔW = (alpha/r)·B·A", minimum=0, exclusive=True),
        Setting("train_on", str, "assistant", "tokens that carry the loss",
                choices=("assistant", "completion", "all")),
        Setting("packing", bool, False, "pack several examples into one row"),
        dataclasses.replace(FINETUNE["lr"], default=2e-4),
        FINETUNE["seed"], FINETUNE["out"],
    ], checks=[lambda c: None if c.lora_r <= 1024 else "lora_r above 1024 is not a low rank"])
    SftConfig = SFT.config_class                       # a dataclass: SftConfig().lora_r == 8
    SFT.add_flags(subparser)                           # --lora-r, --lora-alpha, --train-on, --[no-]packing, ...
    config = SFT.build(args.config, SFT.overrides(args))   # validated, or ConfigError

The ``finetune`` table is ``FINETUNE``; ``RunConfig`` is its config class and
``build_config`` its ``build``. The choices of strategy, optimizer, schedule,
penalty, pooling and device are read from their owners.

>>> config = build_config(overrides={"lr": "3e-4", "strategy": "full"})
>>> config.lr, config.strategy
(0.0003, 'full')
>>> build_config(overrides={"lr": "nan"})
Traceback (most recent call last):
...
tinysft.app.config.ConfigError: lr = nan (--lr): allowed: a finite number > 0
>>> print(to_toml({"lr": 0.0003, "progress": False, "out": "runs/a"}), end="")
lr = 0.0003
progress = false
out = "runs/a"
"""
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

from ..backend import DEVICES
from ..data.chat import DEFAULT_SYSTEM_PROMPT
from ..data.datasets import read_utf8
from ..data.sft import TRAIN_ON
from ..finetune.causal_lm import DECODER_STRATEGIES
from ..finetune.strategies import STRATEGIES
from ..nn import POOLINGS
from ..nn.lora import LLAMA_TARGETS
from ..nn.transformer import parse_dropout_schedule
from ..optim import OPTIMIZERS
from ..optim.regularization import PENALTIES as _PENALTY_KINDS
from ..optim.schedules import SCHEDULES

__all__ = ["ConfigError", "Setting", "Settings", "FINETUNE", "GENERATE", "CHAT", "SFT", "RunConfig", "build_config",
           "to_toml", "read_toml"]


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range, or a config file that cannot be read."""


PENALTIES = ("none",) + tuple(_PENALTY_KINDS)  # "none": no penalty group keys at all
_KINDS = (bool, int, float, str)


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` (also the TOML key; the flag is ``--name-with-dashes``), its type
    (bool, int, float or str), ``default``, a one-line ``help`` and what is allowed.

    Numbers: ``minimum`` / ``maximum`` bounds, each inclusive unless ``exclusive`` /
    ``exclusive_max``; floats must also be finite. Strings: ``choices``, or else any
    non-empty text without NUL characters. ``zero`` says what 0 means ("off", "all")
    for the help text.
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False
    exclusive_max: bool = False
    choices: tuple | None = None
    zero: str | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise TypeError(f"setting {self.name}: kind must be one of {[k.__name__ for k in _KINDS]}")
        self.check(self.default, "default")  # a table whose default is refused is a bug in the table

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """What the setting accepts, in words: "a finite number in [0, 1)", "one of a, b"."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a non-empty text"
        noun = "a finite number" if self.kind is float else "an integer"
        low, high = (None if x is None else f"{x:g}" if self.kind is float else str(x)
                     for x in (self.minimum, self.maximum))
        if low is not None and high is not None:
            text = f"{noun} in {'(' if self.exclusive else '['}{low}, {high}{')' if self.exclusive_max else ']'}"
        elif low is not None:
            text = f"{noun} {'>' if self.exclusive else '≥'} {low}"
        elif high is not None:
            text = f"{noun} {'<' if self.exclusive_max else '≤'} {high}"
        else:
            text = noun
        return text + (f" (0 = {self.zero})" if self.zero else "")

    def parse(self, value, source: str = "default"):
        """``value`` (a flag's text or a TOML value) as this setting's type, checked; else ConfigError."""
        converted = _convert(self.kind, value)
        if converted is None:
            raise ConfigError(f"{self.name} = {value!r} ({source}): expected {self.allowed()}")
        return self.check(converted, source)

    def check(self, value, source: str):
        """``value`` (already of the right type) if it is allowed, else ConfigError."""
        if self.choices is not None:
            ok = value in self.choices
        elif self.kind in (int, float):
            ok = (math.isfinite(value)
                  and (self.minimum is None or (value > self.minimum if self.exclusive else value >= self.minimum))
                  and (self.maximum is None
                       or (value < self.maximum if self.exclusive_max else value <= self.maximum)))
        elif self.kind is str:
            ok = value != "" and "\0" not in value and _is_unicode(value)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{self.name} = {_show(value)} ({source}): allowed: {self.allowed()}")
        return value


def _is_unicode(text: str) -> bool:
    """False for text with lone surrogates (a non-UTF-8 file name from the command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _convert(kind, value):
    """``value`` as ``kind``, or None. Text converts as on a command line ("3", "1e-4", "true");
    TOML values keep their type, except that an integer is accepted where a float belongs."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if kind is bool:
                return {"1": True, "true": True, "yes": True, "on": True,
                        "0": False, "false": False, "no": False, "off": False}.get(text.lower())
            if kind is int:
                return int(text, 10) if text.lstrip("+-").isdigit() else _integral(float(text))
            if kind is float:
                return float(text)
        except (ValueError, OverflowError):
            return None
        return value
    if isinstance(value, bool):
        return value if kind is bool else None
    if kind is float and isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return None
    if kind is int and isinstance(value, float):
        return _integral(value)
    return value if isinstance(value, kind) else None


def _integral(x: float):
    """An integer-valued float ("1e3") as an int; None otherwise (3.5, inf, nan)."""
    return int(x) if math.isfinite(x) and x == int(x) else None


class Settings:
    """A command's table of settings; see the module docstring for how a command declares one.

    ``table[name]`` is a Setting; ``config_class`` is a dataclass with one field per setting
    (``to_dict()`` gives the values by name); ``checks`` are ``config -> message or None``.
    """

    def __init__(self, command: str, settings, checks: tuple[Callable] = ()):
        self.command, self.settings, self.checks = command, {}, tuple(checks)
        for s in settings:
            if s.name in self.settings:
                raise ValueError(f"setting {s.name} is declared twice in the {command} table")
            self.settings[s.name] = s
        fields = [(s.name, s.kind, dataclasses.field(default=s.default, metadata={"setting": s}))
                  for s in self.settings.values()]
        self.config_class = dataclasses.make_dataclass(
            f"{command.title().replace('_', '')}Config", fields,
            namespace={"to_dict": lambda self: dataclasses.asdict(self),
                       "__doc__": f"The settings of ``tinysft {command}`` (see its Settings table)."})

    def __getitem__(self, name: str) -> Setting:
        return self.settings[name]

    def __iter__(self):
        return iter(self.settings.values())

    def add_flags(self, parser) -> None:
        """One flag per setting; a flag left unset leaves the config file or the default in force."""
        import argparse
        for s in self:
            meaning = f"{s.help}; {s.allowed()} (default: {s.default})"
            if s.kind is bool:
                parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                                    help=meaning)
            else:
                parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(), help=meaning)

    def overrides(self, args) -> dict:
        """The flags given on the command line (parsed by ``add_flags``), by setting name."""
        return {s.name: getattr(args, s.name) for s in self if getattr(args, s.name, None) is not None}

    def build(self, toml_path=None, overrides=None):
        """Defaults, then the TOML file's keys, then ``overrides`` (flags); every value checked."""
        given = {}  # name -> (value, where it came from)
        if toml_path is not None:
            given.update({k: (v, f"in {toml_path}") for k, v in read_toml(toml_path).items()})
        given.update({k: (v, self.settings[k].flag if k in self.settings else "--" + k)
                      for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            where = sorted({given[k][1] for k in unknown})
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} ({'; '.join(where)}); "
                              f"known: {', '.join(self.settings)}")
        config = self.config_class(**{k: self.settings[k].parse(v, where) for k, (v, where) in given.items()})
        for check in self.checks:
            message = check(config)
            if message:
                raise ConfigError(message)
        return config


def read_toml(path) -> dict:
    """The key/value pairs of a TOML file; ConfigError naming the file if it cannot be read."""
    text = read_utf8(path, ConfigError)
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


# --------------------------------------------------------------------------- finetune

def _split_leaves_training(c):
    if c.val_fraction + c.test_fraction >= 1:
        return (f"val_fraction + test_fraction = {c.val_fraction + c.test_fraction:g}: must be below 1 "
                "(the training split gets the rest)")


def _has_a_length(c):
    if c.epochs == 0 and c.max_steps == 0:
        return "epochs = 0 and max_steps = 0: set either to a positive number"


def _accumulation_divides_batch(c):
    if c.batch_size % c.accumulation:
        return f"batch_size = {c.batch_size} is not divisible by accumulation = {c.accumulation}"


def _penalty_has_a_strength(c):
    if c.penalty == "none" and c.penalty_lambda:
        return f"penalty_lambda = {c.penalty_lambda:g} needs a penalty (one of {', '.join(PENALTIES[1:])})"


def _dropout_schedule_parses(c):
    try:
        parse_dropout_schedule(c.dropout_schedule)
    except ValueError as error:
        return f"dropout_schedule = {c.dropout_schedule!r}: {error}"


FINETUNE = Settings("finetune", [
    Setting("model", str, "auto", "model folder (config.json, model.safetensors, vocab.txt), "
                                  "a Hugging Face name in the offline cache, or 'auto' (MiniLM-L6)"),
    Setting("data", str, "wordnet", "'wordnet' (supersenses) or a .csv / .jsonl with text,label"),
    Setting("max_examples", int, 3000, "stratified subsample of the dataset", minimum=0, zero="all"),
    Setting("val_fraction", float, 0.15, "share of examples for validation", minimum=0, maximum=1,
            exclusive=True, exclusive_max=True),
    Setting("test_fraction", float, 0.15, "share of examples for the test", minimum=0, maximum=1,
            exclusive=True, exclusive_max=True),
    Setting("strategy", str, "layerwise", "fine-tuning strategy", choices=tuple(STRATEGIES)),
    Setting("optimizer", str, "adamw", "optimizer", choices=tuple(OPTIMIZERS)),
    Setting("lr", float, 1e-4, "learning rate of the top encoder layer", minimum=0, exclusive=True),
    Setting("head_lr", float, 2e-3, "learning rate of the new classification head", minimum=0, exclusive=True),
    Setting("decay", float, 0.8, "layer-wise decay: depth l gets lr·decay^l", minimum=0, maximum=1, exclusive=True),
    Setting("weight_decay", float, 0.01, "decoupled (AdamW) or L2 (SGD/Adam) weight decay", minimum=0),
    Setting("momentum", float, 0.9, "SGD momentum", minimum=0, maximum=1, exclusive_max=True),
    Setting("schedule", str, "linear", "learning-rate schedule", choices=tuple(SCHEDULES)),
    Setting("warmup_ratio", float, 0.1, "share of steps spent warming up", minimum=0, maximum=1, exclusive_max=True),
    Setting("epochs", int, 3, "passes over the training split", minimum=0, zero="max_steps alone"),
    Setting("max_steps", int, 0, "stop after this many optimizer steps", minimum=0, zero="no limit"),
    Setting("batch_size", int, 32, "examples per optimizer step", minimum=1),
    Setting("accumulation", int, 1, "micro-batches per optimizer step", minimum=1),
    Setting("max_length", int, 40, "tokens per example, [CLS] and [SEP] included", minimum=3),
    Setting("clip", float, 1.0, "global gradient-norm clip", minimum=0, zero="off"),
    Setting("penalty", str, "none", "weight penalty of every group", choices=tuple(PENALTIES)),
    Setting("penalty_lambda", float, 0.0, "strength λ of the penalty", minimum=0),
    Setting("dropout", float, 0.1, "dropout before the head", minimum=0, maximum=1, exclusive_max=True),
    Setting("dropout_schedule", str, "none", "each encoder layer's hidden and attention dropout, bottom layer "
                                             "to top: 'linear:LOW:HIGH', one rate per layer 'p0,p1,...', or "
                                             "'none' (the model's own); the head keeps --dropout"),
    Setting("pooling", str, "mean", "how token states become one vector", choices=tuple(POOLINGS)),
    Setting("patience", int, 2, "early stopping: epochs without improvement", minimum=0, zero="off"),
    Setting("min_delta", float, 0.0, "early stopping: smallest improvement that counts", minimum=0),
    Setting("gradual_unfreeze", bool, False, "layerwise: start with the head alone and unfreeze "
                                             "one more layer group from the top each epoch"),
    Setting("checkpoint_every", int, 0, "write a resumable checkpoint every N steps", minimum=0, zero="off"),
    Setting("log_every", int, 5, "write a training record to metrics.jsonl every N steps (and the last)",
            minimum=1),
    Setting("seed", int, 0, "seed for the subsample and the splits, and (unless train_seed is set) for "
                            "shuffling, dropout and the head", minimum=0, maximum=2**32 - 1),
    Setting("train_seed", int, -1, "seed for shuffling, dropout and the head alone (-1: seed); runs that differ "
                                   "only in it share their splits, as an ensemble's members do",
            minimum=-1, maximum=2**32 - 1),
    Setting("device", str, "cpu", "where tensors live", choices=tuple(DEVICES)),
    Setting("out", str, "runs/latest", "run folder for config, metrics, checkpoint, plots"),
    Setting("progress", bool, True, "show a progress bar"),
], checks=[_split_leaves_training, _has_a_length, _accumulation_divides_batch, _penalty_has_a_strength,
           _dropout_schedule_parses])

RunConfig = FINETUNE.config_class
build_config = FINETUNE.build


# --------------------------------------------------------------------------- generate, chat

GENERATE = Settings("generate", [
    Setting("model", str, "auto", "a .gguf file, a folder with a Hugging Face config.json + model.safetensors "
                                  "(a tinysft sft run folder is one), or 'auto' (SmolLM2-135M-Instruct)"),
    Setting("tokenizer", str, "auto", "a .gguf file whose tokenizer to use, or 'auto' (the model's own GGUF; "
                                      "for a folder the .gguf in it, else SmolLM2's)"),
    Setting("system", str, DEFAULT_SYSTEM_PROMPT, "the system prompt of the chat template"),
    Setting("max_new_tokens", int, 256, "most tokens of one reply", minimum=1),
    Setting("temperature", float, 0.0, "sampling temperature", minimum=0, zero="greedy"),
    Setting("top_k", int, 0, "sample among the k most likely tokens only", minimum=0, zero="all"),
    Setting("top_p", float, 1.0, "sample among the most likely tokens whose probability reaches top_p",
            minimum=0, maximum=1, exclusive=True),
    Setting("seed", int, 0, "seed of the sampling", minimum=0, maximum=2**32 - 1),
    Setting("raw", bool, False, "feed the prompt as it is, without the chat template"),
])
CHAT = Settings("chat", [s for s in GENERATE if s.name != "raw"])


# --------------------------------------------------------------------------- sft

def _lora_targets_known(c):
    names = c.lora_targets.split(",")
    unknown = [n for n in names if n not in LLAMA_TARGETS]
    if unknown or len(set(names)) != len(names):
        return (f"lora_targets = {c.lora_targets!r}: give distinct names from {','.join(LLAMA_TARGETS)}, "
                "separated by commas without spaces")


SFT = Settings("sft", [
    dataclasses.replace(GENERATE["model"], help="the decoder to tune: " + GENERATE["model"].help),
    GENERATE["tokenizer"],
    Setting("data", str, "wordnet", "'wordnet' (built-in questions: a noun's category, a word's meaning) "
                                    "or a .jsonl file of chats ({\"messages\": [...]}) or "
                                    "{\"prompt\", \"completion\"} rows"),
    Setting("max_examples", int, 1000, "examples drawn at random by seed (wordnet: 2 per synset)", minimum=0,
            zero="all"),
    Setting("test_fraction", float, 0.1, "share of examples held out for the test", minimum=0, maximum=1,
            exclusive=True, exclusive_max=True),
    Setting("eval_examples", int, 0, "test examples evaluated before and after training", minimum=0,
            zero="the whole test split"),
    Setting("train_on", str, "assistant", "tokens that carry the loss: every assistant reply, the last "
                                          "one only, or every token", choices=TRAIN_ON),
    Setting("packing", bool, False, "pack several examples into each row of max_length tokens"),
    Setting("max_length", int, 128, "tokens per example (or per packed row); longer ones are cut", minimum=2),
    Setting("strategy", str, "lora", "what trains: LoRA adapters only; every weight at lr (--full); every weight, "
                                     "depth d from the top at lr·decay^d (layerwise); all but the token "
                                     "embedding, and the output head tied to it (frozen_embeddings, finetune's "
                                     "encoder_only); every tensor at lr scaled by its Fisher information "
                                     "(discriminative)", choices=tuple(DECODER_STRATEGIES)),
    dataclasses.replace(FINETUNE["decay"], default=0.9,
                        help="layerwise: the head (final norm) gets lr, layer i of L lr·decay^(L-i), "
                             "the embeddings lr·decay^(L+1)"),
    Setting("lora_r", int, 16, "LoRA rank r", minimum=1, maximum=1024),
    Setting("lora_alpha", float, 32.0, "LoRA scale: ΔW = (alpha/r)·B·A", minimum=0, exclusive=True),
    Setting("lora_dropout", float, 0.05, "dropout on the adapters' input", minimum=0, maximum=1, exclusive_max=True),
    Setting("lora_targets", str, ",".join(LLAMA_TARGETS), "projections that get adapters, comma-separated"),
    Setting("rslora", bool, False, "rank-stabilised LoRA: scale alpha/√r"),
    dataclasses.replace(FINETUNE["lr"], default=1e-3, help="peak learning rate (full fine-tuning wants ~2e-5)"),
    dataclasses.replace(FINETUNE["weight_decay"], default=0.0, help="decoupled (AdamW) weight decay"),
    dataclasses.replace(FINETUNE["schedule"], default="cosine"),
    dataclasses.replace(FINETUNE["warmup_ratio"], default=0.05),
    dataclasses.replace(FINETUNE["epochs"], default=1),
    FINETUNE["max_steps"],
    dataclasses.replace(FINETUNE["batch_size"], default=8),
    FINETUNE["accumulation"], FINETUNE["clip"], FINETUNE["log_every"],
    dataclasses.replace(FINETUNE["seed"], help="seed for the split, shuffling, dropout and the adapters' init"),
    dataclasses.replace(FINETUNE["device"], help="where the model and batches live (cuda: CuPy, the CUDA "
                                                 "cross-entropy kernel in the head)"),
    Setting("gguf_dtype", str, "Q8_0", "type of the 2-D weights in the GGUF export", choices=("F16", "Q8_0")),
    dataclasses.replace(FINETUNE["out"], default="runs/sft",
                        help="run folder: config, metrics, plots, adapters, the merged model (HF and GGUF)"),
    FINETUNE["progress"],
], checks=[_has_a_length, _accumulation_divides_batch, _lora_targets_known])


def to_toml(settings: dict) -> str:
    """Flat ``key = value`` TOML for str, bool, int and float values (what a config holds);
    ``Settings.build`` reads it back to the same settings."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            # JSON's escapes are TOML's, but TOML also wants DEL escaped (and no surrogate pairs)
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        return repr(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in settings.items())
