"""A run trained with a dropout schedule, loaded back by ``load_run``: each encoder layer has its rates.

The rates come from run.json's ``dropout_per_layer``; a run folder without them falls back on
config.toml's ``dropout_schedule``; a spoilt record is refused naming run.json. A student that
``tinysft distill`` makes of the run keeps the rates of the teacher's layers it copies.
"""
import json
import shutil

import pytest

from tinysft.app.files import FileError
from tinysft.app.run_folder import load_run
from tinysft.models import BertConfig, BertModel

from .helpers import VOCAB, run_cli

SCHEDULE = "0.05,0.1,0.2,0.4"  # bottom layer first
RATES = [0.05, 0.1, 0.2, 0.4]


def layer_rates(model) -> list:
    return [{name: module.p for name, module in layer.dropouts().items()} for layer in model.bert.encoder.layer]


def same_rate(p) -> dict:
    return {"attention": p, "attention_output": p, "output": p}


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory, csv_data):
    model = tmp_path_factory.mktemp("four_layers")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=48)  # its own rates: 0.1 everywhere
    BertModel(config).save_pretrained(model)
    (model / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    out = tmp_path_factory.mktemp("runs") / "scheduled"
    code, _, err = run_cli(["finetune", "--model", str(model), "--data", str(csv_data), "--max-length", "12",
                            "--max-steps", "1", "--batch-size", "4", "--no-progress", "--dropout-schedule",
                            SCHEDULE, "--dropout", "0.25", "--out", str(out)])
    assert code == 0, err
    return out


def test_load_run_gives_each_layer_the_rates_it_trained_with(scheduled_run):
    _, _, model, _ = load_run(scheduled_run)
    assert layer_rates(model) == [same_rate(p) for p in RATES]
    assert model.head.dropout.p == 0.25


def test_without_the_record_the_rates_come_from_the_schedule(scheduled_run, tmp_path):
    run = shutil.copytree(scheduled_run, tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    del info["dropout_per_layer"]
    (run / "run.json").write_text(json.dumps(info))
    assert layer_rates(load_run(run)[2]) == [same_rate(p) for p in RATES]


@pytest.mark.parametrize("record", [[same_rate(0.1)] * 3, [{"attention": 0.1}] * 4, [same_rate(1.5)] * 4, "0.1"])
def test_a_spoilt_record_is_refused_naming_run_json(scheduled_run, tmp_path, record):
    run = shutil.copytree(scheduled_run, tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    info["dropout_per_layer"] = record
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(FileError, match=r"run\.json: dropout_per_layer must hold one"):
        load_run(run)


def test_a_distilled_student_keeps_the_rates_of_its_layers(scheduled_run, tmp_path):
    out = tmp_path / "student"
    code, _, err = run_cli(["distill", str(scheduled_run), "--max-steps", "1", "--batch-size", "4",
                            "--no-progress", "--out", str(out)])
    assert code == 0, err
    assert layer_rates(load_run(out)[2]) == [same_rate(RATES[0]), same_rate(RATES[2])]  # layers 0 and 2
