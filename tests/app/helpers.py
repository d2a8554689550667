"""Running ``tinysft.app.cli.main`` in-process, and the tiny model and data the app tests train on.

The model is a 1-layer, 8-wide random BERT with a 19-word vocabulary (a valid model folder,
written in milliseconds); the data a 40-row CSV with two labels the vocabulary covers.
"""
import contextlib
import io
from pathlib import Path

from tinysft.app.cli import main
from tinysft.data.datasets import DatasetError
from tinysft.data.wordnet import find_wordnet_noun_file
from tinysft.models import BertConfig, BertModel

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "cat", "dog", "bird", "happy", "sad", "angry",
         "small", "big", "animal", "feeling", ",", "."]


def run_cli(argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``tinysft.app.cli.main(argv)``; usable from module-scoped fixtures."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result, *fragments) -> str:
    """Status 2, nothing but one ``tinysft: error:`` line on stderr, no traceback."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinysft: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_tiny_model(folder: Path, max_position_embeddings: int = 48) -> Path:
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=max_position_embeddings)
    BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def csv_rows(n: int = 20) -> list[str]:
    """A header and 2·n rows: ``animal`` and ``feeling`` examples in turn."""
    rows = ["text,label"]
    for i in range(n):
        rows.append(f"{'a small' if i % 2 else 'the big'} {('cat', 'dog', 'bird')[i % 3]} animal,animal")
        rows.append(f"a {('happy', 'sad', 'angry')[i % 3]} feeling.,feeling")
    return rows


def has_wordnet() -> bool:
    """Whether WordNet's data.noun is installed (Debian's wordnet-base)."""
    try:
        find_wordnet_noun_file()
    except DatasetError:
        return False
    return True
