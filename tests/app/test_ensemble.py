"""``tinysft finetune --seeds`` and ``tinysft ensemble`` on the tiny model and CSV (see helpers.py)."""
import re

import numpy as np
import pytest

from tinysft.app.ensemble import common_test_split
from tinysft.app.run_folder import load_run
from tinysft.data import DataLoader, tokenizing_collate
from tinysft.finetune import evaluate_ensemble

from .helpers import assert_user_error, csv_rows, run_cli

FLAGS = ["--max-steps", "4", "--batch-size", "4", "--max-length", "12", "--strategy", "full", "--lr", "0.05",
         "--head-lr", "0.05", "--no-progress"]
ROW = re.compile(r"^  (member (\S+)|ensemble, (mean of probabilities|majority vote)) +accuracy (\S+)  macro_f1 (\S+)",
                 re.M)


@pytest.fixture(scope="module")
def members(tiny_model, csv_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    code, stdout, err = run_cli(["finetune", "--model", str(tiny_model), "--data", str(csv_data), *FLAGS,
                                 "--seeds", "0,1,2", "--out", str(out)])
    assert code == 0, err
    return out, [out / f"seed{s}" for s in (0, 1, 2)], stdout


def test_seeds_train_members_that_differ_only_in_their_training_seed(members):
    out, runs, _ = members
    weights = [load_run(r)[2].state_dict() for r in runs]
    assert not np.allclose(weights[0]["head.classifier.weight"], weights[1]["head.classifier.weight"])
    labels, test = common_test_split(runs)  # one split for all: else this refuses
    assert labels == ["animal", "feeling"] and len(test) > 0


def test_ensemble_prints_members_and_both_ensembles(members):
    out, runs, seeds_output = members
    code, stdout, err = run_cli(["ensemble", *map(str, runs)])
    assert code == 0, err
    assert stdout in seeds_output  # --seeds ends with the same table
    rows = ROW.findall(stdout)
    assert [r[1] for r in rows[:3]] == [str(r) for r in runs] and [r[2] for r in rows[3:]] == [
        "mean of probabilities", "majority vote"]
    # each member's accuracy is what ``tinysft eval`` says of it
    for run, row in zip(runs, rows):
        code, text, err = run_cli(["eval", str(run)])
        assert code == 0, err
        assert f"accuracy {row[3]}" in text and f"macro_f1 {row[4]}" in text
    # the ensembles' figures are evaluate_ensemble's on the members' models
    config, info, model, tokenizer = load_run(runs[0])
    _, test = common_test_split(runs)
    loader = DataLoader(test, 64, shuffle=False, collate=tokenizing_collate(tokenizer, config.max_length))
    models = [load_run(r)[2] for r in runs]
    for method, row in zip(("mean", "vote"), rows[3:]):
        want = evaluate_ensemble(models, loader, method, num_classes=2)
        assert (row[3], row[4]) == (f"{want['accuracy']:.4f}", f"{want['macro_f1']:.4f}")


def test_ensemble_refuses_runs_with_other_labels_or_splits(members, tiny_model, csv_data, tmp_path):
    _, runs, _ = members
    other = tmp_path / "other.csv"
    other.write_text("\n".join(row.replace(",feeling", ",emotion") for row in csv_rows()) + "\n")
    relabelled, reseeded = tmp_path / "relabelled", tmp_path / "reseeded"
    for data, seed, out in ((other, "0", relabelled), (csv_data, "1", reseeded)):
        code, _, err = run_cli(["finetune", "--model", str(tiny_model), "--data", str(data), *FLAGS,
                                "--seed", seed, "--out", str(out)])
        assert code == 0, err
    assert_user_error(run_cli(["ensemble", str(runs[0]), str(relabelled)]), "different label sets", "'feeling'",
                      "'emotion'")
    assert_user_error(run_cli(["ensemble", str(runs[0]), str(reseeded)]), "different splits", "seed = 1 and 0")
    assert_user_error(run_cli(["ensemble", str(runs[0])]), "at least two runs")
    assert_user_error(run_cli(["ensemble", str(runs[0]), str(tmp_path)]), "not a finished run folder")


def test_seeds_must_be_distinct_numbers(tiny_model, csv_data, tmp_path):
    base = ["finetune", "--model", str(tiny_model), "--data", str(csv_data), *FLAGS, "--out", str(tmp_path / "r")]
    assert_user_error(run_cli([*base, "--seeds", "0,0"]), "distinct")
    assert_user_error(run_cli([*base, "--seeds", "0,x"]), "train_seed = 'x' (--seeds)")
    assert_user_error(run_cli([*base, "--seeds", "0,1", "--train-seed", "3"]), "one of --seeds and --train-seed")
    assert not (tmp_path / "r").exists()
