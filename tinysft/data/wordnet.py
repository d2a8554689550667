"""Built-in task: WordNet noun supersenses (classify a synset's gloss into one of 26 classes).

Each line of WordNet 3.0's `data.noun` is one synset:
`offset lex_filenum ss_type w_cnt word lex_id ... | gloss`. The text is the gloss
(definition and examples); the label is the lexicographer file (03 noun.Tops ... 28 noun.time).

    >>> ds = load_wordnet_supersenses(max_examples=3000, seed=0)
    >>> len(ds), ds.num_classes, ds.label_names[:3]
    (3000, 26, ['noun.Tops', 'noun.act', 'noun.animal'])
"""

from __future__ import annotations

import os
import sys
import zipfile
from typing import NamedTuple

import numpy as np

from tinysft.data.datasets import DatasetError, TextClassificationDataset
from tinysft.data.splits import stratified_sample

__all__ = ["NOUN_LEXNAMES", "Synset", "find_wordnet_noun_file", "parse_synsets", "parse_data_noun",
           "load_wordnet_supersenses"]

# WordNet's lexicographer files 03..28 (the noun ones), in file-number order.
NOUN_LEXNAMES = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time",
]
FIRST_NOUN_LEXFILE = 3
SYSTEM_DATA_NOUN = "/usr/share/wordnet/data.noun"  # Debian/Ubuntu package wordnet-base

_INSTALL_HINT = ("install it with `apt-get install wordnet-base` (gives /usr/share/wordnet/data.noun), "
                 "or `python -m nltk.downloader wordnet`, or pass path= to a data.noun file")


def _nltk_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    dirs.append(os.path.expanduser("~/nltk_data"))
    for prefix in (sys.prefix, "/usr/share", "/usr/local/share", "/usr/lib", "/usr/local/lib"):
        dirs.append(os.path.join(prefix, "nltk_data"))
    return dirs


def _exists(path: str) -> bool:
    zip_path, inside_zip, _ = path.partition(".zip" + os.sep)
    return os.path.isfile(zip_path + ".zip") if inside_zip else os.path.isfile(path)


def find_wordnet_noun_file(path: str | os.PathLike | None = None) -> str:
    """Locate `data.noun`: `path` (a file, or a folder holding it), else the system or NLTK copies.

    NLTK's zipped corpus is supported: the path then reads `.../corpora/wordnet.zip/wordnet/data.noun`.
    """
    if path is not None:
        path = os.fspath(path)
        candidate = os.path.join(path, "data.noun") if os.path.isdir(path) else path
        if _exists(candidate):
            return candidate
        raise DatasetError(f"WordNet data.noun not found at {path!r}; {_INSTALL_HINT}")
    candidates = [SYSTEM_DATA_NOUN]
    for d in _nltk_dirs():
        candidates.append(os.path.join(d, "corpora", "wordnet", "data.noun"))
        candidates.append(os.path.join(d, "corpora", "wordnet.zip", "wordnet", "data.noun"))
    for candidate in candidates:
        if _exists(candidate):
            return candidate
    raise DatasetError(f"WordNet data.noun not found (looked in {os.path.dirname(SYSTEM_DATA_NOUN)} and "
                       f"the NLTK data folders {_nltk_dirs()}); {_INSTALL_HINT}")


def _read_text(path: str) -> str:
    zip_path, inside_zip, member = path.partition(".zip" + os.sep)
    if inside_zip:
        with zipfile.ZipFile(zip_path + ".zip") as z:
            return z.read(member.replace(os.sep, "/")).decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


class Synset(NamedTuple):
    """One line of `data.noun`: its offset, its lemmas (WordNet's spelling, `laser-guided_bomb`),
    its label (lex_filenum − 3, an index into NOUN_LEXNAMES) and its gloss."""
    offset: str
    lemmas: tuple
    label: int
    gloss: str


def parse_synsets(path: str) -> list[Synset]:
    """Every synset of a `data.noun` file, in file order.

    A line reads `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt ... | gloss`,
    with `w_cnt` in hexadecimal; the licence header's lines start with two spaces.
    """
    synsets = []
    for line_num, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.startswith("  ") or not line.strip():  # licence header
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split(" ", 4)
        try:
            count = int(fields[3], 16)
            words = fields[4].split(" ", 2 * count)[:2 * count]
        except (IndexError, ValueError):
            count, words = 0, []
        if not sep or count < 1 or len(words) < 2 * count or not fields[1].isdigit():
            raise DatasetError(f"{path}: line {line_num}: not a WordNet synset line")
        label = int(fields[1]) - FIRST_NOUN_LEXFILE
        if not 0 <= label < len(NOUN_LEXNAMES):
            raise DatasetError(f"{path}: line {line_num}: lex_filenum {fields[1]} is not a noun file (03-28)")
        synsets.append(Synset(fields[0], tuple(words[::2]), label, gloss.strip()))
    if not synsets:
        raise DatasetError(f"{path}: no synsets found")
    return synsets


def parse_data_noun(path: str) -> tuple[list[str], np.ndarray]:
    """All (gloss, lex_filenum - 3) pairs of a `data.noun` file, in file order."""
    synsets = parse_synsets(path)
    return [s.gloss for s in synsets], np.asarray([s.label for s in synsets], dtype=np.int64)


def load_wordnet_supersenses(path: str | os.PathLike | None = None, max_examples: int | None = None,
                             seed: int = 0) -> TextClassificationDataset:
    """Glosses labelled with their noun supersense; `max_examples` takes a stratified subsample by `seed`."""
    glosses, labels = parse_data_noun(find_wordnet_noun_file(path))
    dataset = TextClassificationDataset(glosses, labels, list(NOUN_LEXNAMES))
    if max_examples is not None:
        dataset = dataset.subset(stratified_sample(labels, max_examples, seed))
    return dataset
