"""LoRA adapters in Hugging Face PEFT's folder layout: save them for PEFT, load PEFT's back.

A folder holds two files:

    adapter_config.json          LoraConfig's fields: peft_type "LORA", r, lora_alpha, lora_dropout,
                                 target_modules, use_rslora, bias "none", ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                 base_model.model.<module>.lora_B.weight   (out, r)

``<module>`` is the dotted module name in the model (tinysft keeps Hugging Face's
names, e.g. ``model.layers.0.self_attn.q_proj``); PEFT writes the keys without the
adapter name, and so does this module. ``PeftModel.from_pretrained(base, folder)``
loads what ``save_adapter`` writes, and ``load_adapter`` reads what PEFT saves for
plain LoRA (no DoRA, biases, rank patterns or extra saved modules: those are
refused by name).

    >>> apply_lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    >>> save_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    >>> load_adapter(fresh_base_model, "out/adapter")
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from tinysft.io.atomic import atomic_write_text
from tinysft.io.bounds import parse_json_object
from tinysft.io.safetensors import SafetensorsError, SafetensorsFile, save_file
from tinysft.nn.lora import apply_lora, find_targets, lora_layers

__all__ = ["AdapterError", "CONFIG_NAME", "WEIGHTS_NAME", "KEY_PREFIX", "adapter_config", "save_adapter",
           "read_adapter_config", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel → LoraModel → the wrapped model

# LoraConfig fields whose non-default values change the adapter (its math, or which weights it
# has): tinysft has plain LoRA only. PLAIN_LORA goes into every saved config (PEFT has known
# these fields since 0.9); a folder that sets any field of REFUSED to another value is refused.
PLAIN_LORA = {"fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
              "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
REFUSED = {**PLAIN_LORA, "lora_bias": False, "exclude_modules": None, "layer_replication": None,
           "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
           "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None}


class AdapterError(ValueError):
    """An adapter folder (or a model to save) that does not fit; the message names the file."""


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _target_modules(model, names: list):
    """The ``target_modules`` value that selects exactly ``names`` under PEFT's rules: the sorted
    last name parts when they select nothing else, else a regular expression of the full names."""
    leaves = sorted({_leaf(n) for n in names})
    inside = tuple(n + "." for n in names)  # the adapters' own sub-modules are not in the base model
    selected = [n for n, _ in model.named_modules()
                if n and not n.startswith(inside) and any(n == t or n.endswith("." + t) for t in leaves)]
    if sorted(selected) == sorted(names):
        return leaves
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def adapter_config(model, base_model_name_or_path=None, task_type: str = "CAUSAL_LM") -> dict:
    """The adapter_config.json fields for the adapters in ``model`` (all must share r, α, dropout, rsLoRA)."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA adapters to save (call apply_lora first)")
    settings = {(m.r, m.alpha, m.lora_dropout.p, m.rslora) for _, m in layers}
    if len(settings) > 1:
        raise AdapterError(f"adapters with different (r, alpha, dropout, rslora) {sorted(settings)} cannot share "
                           f"one {CONFIG_NAME}; save them from separate models")
    (r, alpha, dropout, rslora), = settings
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "r": r,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
            "target_modules": _target_modules(model, [n for n, _ in layers]), "use_rslora": rslora,
            "init_lora_weights": True, **PLAIN_LORA}


def save_adapter(model, folder, base_model_name_or_path=None, task_type: str = "CAUSAL_LM") -> Path:
    """Write ``model``'s LoRA adapters to ``folder`` as PEFT saves them (created if needed); returns it.

    Each file is written atomically. Merged adapters are saved all the same (A and B
    are kept on merge).
    """
    config = adapter_config(model, base_model_name_or_path, task_type)
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.numpy()  # (r, in)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.numpy()  # (out, r)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder) -> dict:
    """The validated fields of ``folder``/adapter_config.json: r, lora_alpha, lora_dropout,
    target_modules (a list or a regular expression), use_rslora. Raises AdapterError naming the file."""
    path = Path(folder) / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})") \
            from None
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path}: not readable as UTF-8 text ({error})") from None
    config = parse_json_object(text, lambda message: AdapterError(f"{path}: {message}"))
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters load here")
    for field, default in REFUSED.items():
        value = config.get(field, default)
        if value != default and not (default is None and value in ([], {})):
            raise AdapterError(f"{path}: {field} = {json.dumps(value)} is not supported (plain LoRA only: "
                               f"{field} must be {json.dumps(default)})")
    missing = [f for f in ("r", "lora_alpha", "target_modules") if f not in config]
    if missing:
        raise AdapterError(f"{path}: missing field(s) {', '.join(missing)}")
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    targets, rslora = config["target_modules"], config.get("use_rslora", False)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {json.dumps(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a finite number, got {json.dumps(alpha)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{path}: lora_dropout must be in [0, 1), got {json.dumps(dropout)}")
    if not isinstance(rslora, bool):
        raise AdapterError(f"{path}: use_rslora must be true or false, got {json.dumps(rslora)}")
    if targets == "all-linear":
        raise AdapterError(f"{path}: target_modules 'all-linear' is not supported; list the module names")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) and t for t in targets))):
        raise AdapterError(f"{path}: target_modules must be a list of module names or a regular expression, "
                           f"got {json.dumps(targets)}")
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": targets,
            "use_rslora": rslora}


def _few(items, n=4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_adapter(model, folder, generator=None):
    """Apply LoRA to ``model`` as ``folder``/adapter_config.json describes and load the adapter
    weights from ``folder``/adapter_model.safetensors. In place; returns apply_lora's LoRASummary.

    The file is checked against the model before the model is touched: every key
    must be present with its shape ((r, in) for A, (out, r) for B) and no other key
    may appear; an AdapterError names the file and the keys at fault. Values are
    cast to the model's dtype.
    """
    config = read_adapter_config(folder)
    path = Path(folder) / WEIGHTS_NAME
    try:
        targets = find_targets(model, config["target_modules"])
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{Path(folder) / CONFIG_NAME}: {error}") from None
    r = config["r"]
    expected = {}
    for name, linear in targets:
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = (r, linear.in_features)
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = (linear.out_features, r)
    try:
        weights = SafetensorsFile(path)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file") from None
    except (OSError, SafetensorsError) as error:
        raise AdapterError(f"{path}: {error}") from None
    with weights:
        keys = set(weights.keys())
        problems = []
        missing = [k for k in expected if k not in keys]
        if missing:
            problems.append(f"missing keys: {_few(missing)}")
        unexpected = sorted(keys - set(expected))
        if unexpected:
            problems.append(f"unexpected keys: {_few(unexpected)}")
        mismatched = [f"{k} has shape {weights.info(k).shape}, the model needs {shape}"
                      for k, shape in expected.items() if k in keys and tuple(weights.info(k).shape) != shape]
        if mismatched:
            problems.append("shape mismatches: " + _few(mismatched, 3))
        kinds = {weights.info(k).dtype for k in keys & set(expected)}
        if not kinds <= {"F64", "F32", "F16", "BF16"}:
            problems.append(f"non-float tensors ({', '.join(sorted(kinds))})")
        if problems:
            raise AdapterError(f"{path}: does not fit the model (r = {r} from {CONFIG_NAME}): " + "; ".join(problems))
        values = {key: weights.get(key) for key in expected}
    bad = [key for key, value in values.items() if not np.all(np.isfinite(value))]
    if bad:
        raise AdapterError(f"{path}: non-finite values in {_few(bad)}")
    summary = apply_lora(model, r, config["lora_alpha"], config["lora_dropout"], config["target_modules"],
                         rslora=config["use_rslora"], generator=generator)
    model.load_state_dict({key[len(KEY_PREFIX):]: value for key, value in values.items()}, strict=False)
    return summary
