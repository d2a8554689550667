"""``tinysft finetune --dropout-schedule``: the rates reach the model and run.json, bad schedules are refused."""
import json

from .helpers import assert_user_error, run_cli


def test_finetune_records_the_rates_per_layer(tiny_model, csv_data, tmp_path):
    base = ["finetune", "--model", str(tiny_model), "--data", str(csv_data), "--max-steps", "2", "--batch-size",
            "4", "--max-length", "12", "--no-progress"]
    code, _, err = run_cli([*base, "--dropout-schedule", "linear:0.3:0.9", "--out", str(tmp_path / "a")])
    assert code == 0, err
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert info["dropout_per_layer"] == [{"attention": 0.3, "attention_output": 0.3, "output": 0.3}]  # one layer
    assert_user_error(run_cli([*base, "--dropout-schedule", "0.1,0.2", "--out", str(tmp_path / "b")]),
                      "2 rates for 1 layers")
    assert_user_error(run_cli([*base, "--dropout-schedule", "linear:0.1", "--out", str(tmp_path / "c")]),
                      "dropout_schedule = 'linear:0.1'")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
