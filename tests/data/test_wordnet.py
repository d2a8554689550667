import os
import zipfile

import numpy as np
import pytest

from tinysft.data import wordnet
from tinysft.data.datasets import DatasetError
from tinysft.data.wordnet import NOUN_LEXNAMES, find_wordnet_noun_file, load_wordnet_supersenses, parse_data_noun

TINY = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which is "
    "perceived or known or inferred to have its own distinct existence (living or nonliving)  \n"
    "00015388 05 n 01 animal 0 000 | a living organism; \"animals are living things\"  \n"
    "00017222 20 n 01 plant 0 000 | (botany) a living organism lacking the power of locomotion  \n"
    "00017223 20 n 01 tree 0 000 | a tall perennial woody plant  \n"
)


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(TINY)
    return path


def test_lexnames():
    assert len(NOUN_LEXNAMES) == 26
    assert NOUN_LEXNAMES[0] == "noun.Tops" and NOUN_LEXNAMES[2] == "noun.animal" and NOUN_LEXNAMES[-1] == "noun.time"


def test_parse_tiny_file(tiny_file):
    glosses, labels = parse_data_noun(str(tiny_file))
    assert glosses[0].startswith("that which is perceived") and glosses[0].endswith("(living or nonliving)")
    assert glosses[1] == 'a living organism; "animals are living things"'
    assert [NOUN_LEXNAMES[i] for i in labels] == ["noun.Tops", "noun.animal", "noun.plant", "noun.plant"]
    ds = load_wordnet_supersenses(tiny_file.parent)  # a folder holding data.noun
    assert len(ds) == 4 and ds.num_classes == 26 and ds.labels.tolist() == labels.tolist()


def test_malformed_lines(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text("00001740 03 n 01 entity 0 000 no gloss marker\n")
    with pytest.raises(DatasetError, match="line 1: not a WordNet synset line"):
        parse_data_noun(str(path))
    path.write_text("  licence only\n")
    with pytest.raises(DatasetError, match="no synsets"):
        parse_data_noun(str(path))
    path.write_text("00001740 44 n 01 x 0 000 | verb file\n")
    with pytest.raises(DatasetError, match="lex_filenum 44 is not a noun file"):
        parse_data_noun(str(path))


def test_missing_wordnet_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="apt-get install wordnet-base"):
        find_wordnet_noun_file(tmp_path / "nothing")
    monkeypatch.setattr(wordnet, "SYSTEM_DATA_NOUN", str(tmp_path / "none" / "data.noun"))
    monkeypatch.setattr(wordnet, "_nltk_dirs", lambda: [str(tmp_path / "nltk")])
    with pytest.raises(DatasetError, match="apt-get install wordnet-base"):
        find_wordnet_noun_file()


def test_finds_nltk_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "SYSTEM_DATA_NOUN", str(tmp_path / "none" / "data.noun"))
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    assert str(tmp_path / "nltk") in wordnet._nltk_dirs()
    zipped = tmp_path / "nltk" / "corpora" / "wordnet.zip"
    zipped.parent.mkdir(parents=True)
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("wordnet/data.noun", TINY)
    found = find_wordnet_noun_file()
    assert found == os.path.join(str(zipped), "wordnet", "data.noun")
    assert len(load_wordnet_supersenses()) == 4
    plain = tmp_path / "nltk" / "corpora" / "wordnet" / "data.noun"
    plain.parent.mkdir()
    plain.write_text(TINY)
    assert find_wordnet_noun_file() == str(plain)


@pytest.fixture(scope="module")
def system_wordnet():
    if not os.path.exists(wordnet.SYSTEM_DATA_NOUN):
        pytest.skip("WordNet absent: apt-get install wordnet-base")
    return load_wordnet_supersenses()


def test_full_wordnet_counts(system_wordnet):
    ds = system_wordnet
    assert len(ds) == 82_115 and ds.num_classes == 26
    counts = ds.class_counts()
    assert counts.min() == 42 and counts.max() == 11_587 and (counts > 0).all()
    assert ds.texts[0].startswith("that which is perceived or known or inferred")
    assert ds.label_names[ds.labels[0]] == "noun.Tops"


def test_subsample_is_stratified_and_deterministic(system_wordnet):
    a = load_wordnet_supersenses(max_examples=3000, seed=0)
    b = load_wordnet_supersenses(max_examples=3000, seed=0)
    c = load_wordnet_supersenses(max_examples=3000, seed=1)
    assert len(a) == 3000 and a.texts == b.texts and a.texts != c.texts
    share = system_wordnet.class_counts() / len(system_wordnet)
    assert np.abs(a.class_counts() - 3000 * share).max() < 1
