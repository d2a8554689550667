"""Training checkpoints that survive a crash at any point of a save.

Layout of a checkpoint folder:

    state.json                 manifest + JSON training state (the commit point)
    model-000007.safetensors   model tensors and the state's arrays

A save writes a new, numbered tensors file (atomically), then atomically
replaces `state.json`, which names that file; only then are older tensors
files deleted. A save killed at any step therefore leaves the previous
`state.json` and the tensors file it names intact, and `load_checkpoint`
returns the previous checkpoint.

`state` is any JSON-like tree (dicts with string keys, lists, tuples, str,
int of any size, float, bool, None, NumPy scalars). NumPy arrays inside it, such
as optimizer moments, are stored in the tensors file under the name
`__state__/<path>` (path = keys and list indices joined by "/") and
replaced in JSON by `{"__tensor__": "<that name>"}`; loading puts them back.
Tuples come back as lists, NumPy scalars as Python numbers.

    >>> save_checkpoint("runs/a/ckpt", {"w": w}, {"step": 10, "adam": {"m": m}})
    >>> tensors, state = load_checkpoint("runs/a/ckpt")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tinysft.io.atomic import TMP_MARKER, atomic_write_text
from tinysft.io.safetensors import SafetensorsError, load_file, save_file

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "STATE_PREFIX"]

FORMAT = "tinysft-checkpoint"
VERSION = 1
MANIFEST = "state.json"
STATE_PREFIX = "__state__/"
_TENSORS_RE = re.compile(r"model-(\d+)\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or its state cannot be stored as JSON."""


# --------------------------------------------------------------------------- state <-> JSON + arrays


def _split_state(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """Return a JSON-ready copy of `value`, moving NumPy arrays into `arrays`."""
    if isinstance(value, np.ndarray):
        name = STATE_PREFIX + path
        while name in arrays:  # keys containing "/" could collide with nested paths
            name += "~"
        arrays[name] = value
        return {"__tensor__": name}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"state key {key!r} at {path or '<root>'!r} is not a string")
            if key == "__tensor__":
                raise CheckpointError(f"state key '__tensor__' at {path or '<root>'!r} is reserved")
            out[key] = _split_state(item, f"{path}/{key}" if path else key, arrays)
        return out
    if isinstance(value, (list, tuple)):
        return [_split_state(item, f"{path}/{i}" if path else str(i), arrays) for i, item in enumerate(value)]
    if isinstance(value, np.generic) and isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CheckpointError(f"state value at {path or '<root>'!r} has unsupported type {type(value).__name__}")


def _join_state(value: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
    """Inverse of `_split_state`: replace `{"__tensor__": name}` by the stored array."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            name = value["__tensor__"]
            if name not in arrays:
                raise CheckpointError(f"{where}: state refers to tensor {name!r}, which the tensors file lacks")
            return arrays[name]
        return {k: _join_state(v, arrays, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_state(v, arrays, where) for v in value]
    return value


# --------------------------------------------------------------------------- save / load


def _generations(directory: str) -> list[int]:
    return [int(m.group(1)) for f in os.listdir(directory) if (m := _TENSORS_RE.fullmatch(f))]


def save_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                    state: Mapping[str, Any] | None = None) -> None:
    """Save `tensors` and the JSON-like `state` into `directory`, replacing any previous checkpoint."""
    directory = os.fspath(directory)
    bad = [k for k in tensors if k.startswith(STATE_PREFIX)]
    if bad:
        raise CheckpointError(f"tensor names may not start with {STATE_PREFIX!r}: {bad}")
    arrays: dict[str, np.ndarray] = {}
    state_json = _split_state(dict(state or {}), "", arrays)
    os.makedirs(directory, exist_ok=True)

    generation = max(_generations(directory), default=0) + 1
    tensors_name = f"model-{generation:06d}.safetensors"
    save_file({**tensors, **arrays}, os.path.join(directory, tensors_name), metadata={"format": FORMAT})
    manifest = {"format": FORMAT, "version": VERSION, "tensors": tensors_name, "state": state_json}
    atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1) + "\n")

    # Committed; drop older tensors files and temp files left by interrupted saves.
    for f in os.listdir(directory):
        stale_tensors = _TENSORS_RE.fullmatch(f) and f != tensors_name
        stale_tmp = f.startswith((".model-", f".{MANIFEST}")) and TMP_MARKER in f
        if stale_tensors or stale_tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, f))


def load_checkpoint(directory: str | os.PathLike, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Return `(tensors, state)` saved by `save_checkpoint`; raise CheckpointError if missing or corrupt.

    `mmap=True` maps the tensors read-only instead of copying them; on POSIX the maps stay valid
    after a later save deletes the file.
    """
    directory = os.fspath(directory)
    manifest_path = os.path.join(directory, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {directory!r}: {MANIFEST} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: corrupt checkpoint manifest: {e}") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("tensors"), str) and isinstance(manifest.get("state"), dict)):
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest "
                              "(expected keys format, version, tensors, state)")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_path}: unsupported checkpoint version {manifest.get('version')!r}")

    tensors_path = os.path.join(directory, os.path.basename(manifest["tensors"]))
    try:
        everything = load_file(tensors_path, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path} names {manifest['tensors']!r}, which is missing") from None
    except SafetensorsError as e:
        raise CheckpointError(f"corrupt checkpoint tensors: {e}") from e
    arrays = {k: v for k, v in everything.items() if k.startswith(STATE_PREFIX)}
    tensors = {k: v for k, v in everything.items() if not k.startswith(STATE_PREFIX)}
    return tensors, _join_state(manifest["state"], arrays, manifest_path)
