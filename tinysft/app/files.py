"""The files a command is pointed at, read with one-line errors that name the file.

A command reads JSON it did not write (a model's ``config.json``) or that a
crash or a hand edit may have spoilt (a run's ``run.json``). Each fault, be it
bytes that are not UTF-8, text that is not JSON, JSON nested beyond reason, a
missing key or a value of the wrong type, becomes a ``FileError`` whose message
starts with the file's path.
"""
import math
from dataclasses import fields
from pathlib import Path

from ..data import WordPieceTokenizer
from ..data.datasets import read_utf8
from ..io.bounds import parse_json_object
from ..models import BertConfig

__all__ = ["FileError", "read_json", "require", "read_model_config", "read_tokenizer"]


class FileError(ValueError):
    """A file that cannot be read, is malformed, or lacks what the command needs."""


def read_json(path) -> dict:
    """The JSON object in ``path``; FileError naming the file otherwise."""
    return parse_json_object(read_utf8(path, FileError), lambda message: FileError(f"{path}: {message}"))


def _is(value, kind) -> bool:
    """``value`` is of ``kind`` as JSON means it: bool is not a number; an int is a float; floats finite."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def require(path, data: dict, kinds: dict) -> dict:
    """``data`` if it has every key of ``kinds`` with a value of that type; FileError naming the file and key."""
    for key, kind in kinds.items():
        if key not in data:
            raise FileError(f"{path}: missing key {key!r}")
        if not _is(data[key], kind):
            raise FileError(f"{path}: {key} = {data[key]!r} is not {_NAMES.get(kind, kind.__name__)}")
    return data


_NAMES = {int: "an integer", float: "a finite number", str: "a string", list: "a list", dict: "an object",
          bool: "true or false"}


def read_model_config(model_dir) -> BertConfig:
    """The ``config.json`` of a BERT-family model folder, every field the architecture reads checked by
    its declared type (sizes at least 1), or FileError naming the file."""
    path = Path(model_dir) / "config.json"
    data = read_json(path)
    known = {f.name: f.type for f in fields(BertConfig) if f.name in data}
    require(path, data, known)
    small = [name for name, kind in known.items() if kind is int and name != "pad_token_id" and data[name] < 1]
    if small:
        raise FileError(f"{path}: {small[0]} = {data[small[0]]} must be at least 1")
    try:
        return BertConfig.from_dict(data)
    except (ValueError, TypeError) as error:
        raise FileError(f"{path}: {error}") from None


def read_tokenizer(model_dir) -> WordPieceTokenizer:
    """The WordPiece tokenizer of a model folder; FileError naming vocab.txt or tokenizer_config.json
    if one cannot be read."""
    folder = Path(model_dir)
    read_utf8(folder / "vocab.txt", FileError)
    if (folder / "tokenizer_config.json").exists():
        read_json(folder / "tokenizer_config.json")
    try:
        return WordPieceTokenizer.from_dir(folder)
    except (ValueError, TypeError) as error:
        raise FileError(f"{folder}: vocab.txt or tokenizer_config.json: {error}") from None
