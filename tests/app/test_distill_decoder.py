"""``tinysft distill SFT_RUN`` on a tiny 4-layer random decoder (tests/app/tiny_decoder.py) and a
JSONL file of prompt/completion rows.

The student run's folder is read back independently: ``load_decoder`` loads it, its layers are
the teacher's chosen layers (bit for bit when the learning rate cannot move a float32 weight),
the printed figures are ``sft.evaluate``'s on the teacher's own test split for each model,
``generate --model`` and ``serve`` take it, run.json records the teacher, the layers, T and α;
then the refusals, each in one line before any folder exists.
"""
import json
import re

import numpy as np
import pytest

from tinysft.app.config import SFT
from tinysft.app.generate import load_decoder
from tinysft.app.serve import ChatService, load_service
from tinysft.app.sft import evaluate, load_examples
from tinysft.io.safetensors import load_file
from tinysft.models.export import export_gguf, save_pretrained

from .helpers import assert_user_error, run_cli
from .tiny_decoder import tiny_decoder, tokenizer_metadata

FLAGS = ["--batch-size", "2", "--no-progress"]
LINE = re.compile(r"^(teacher|student) (\S+): (\d+) layers, ([\d,]+) parameters, ([\d.]+) MB; test loss (\S+) per "
                  r"supervised token, exact match (\S+)% of (\d+) answers; forward ([\d.]+) tokens/s$", re.M)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An sft run (LoRA, one step) of a 4-layer decoder on 10 rows: 8 to train on, 2 to test."""
    folder = tmp_path_factory.mktemp("decoder")
    model = tiny_decoder(0, num_hidden_layers=4)
    save_pretrained(model, folder)
    export_gguf(model, folder / "tiny.gguf", tokenizer_metadata(), "F32", name="tiny")
    data = tmp_path_factory.mktemp("data") / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"number {i}"}) + "\n" for i in range(10)))
    run = tmp_path_factory.mktemp("teacher") / "run"
    code, _, err = run_cli(["sft", "--model", str(folder), "--data", str(data), "--test-fraction", "0.2",
                            "--max-steps", "1", "--max-length", "256", "--lr", "1e-2", *FLAGS, "--out", str(run)])
    assert code == 0, err
    return run


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    code, stdout, err = run_cli(["distill", str(teacher), "--max-steps", "2", "--temperature", "3", "--alpha", "0.7",
                                 *FLAGS, "--out", str(out)])
    assert code == 0, err
    return out, stdout


def test_the_student_folder_loads_and_trained(teacher, distilled):
    out, _ = distilled
    student, tokenizer = load_decoder(str(out))
    assert student.config.num_hidden_layers == 2 and tokenizer.vocab_size == student.config.vocab_size
    for name in ("config.toml", "run.json", "metrics.jsonl", "config.json", "model.safetensors", "model-Q8_0.gguf"):
        assert (out / name).is_file(), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]
    before, after = load_file(teacher / "model.safetensors"), load_file(out / "model.safetensors")
    assert not np.array_equal(before["model.layers.2.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])


def test_the_layers_are_the_chosen_teacher_layers(teacher, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", str(teacher), "--student-layers", "1,3", "--lr", "1e-30", "--max-steps", "1",
                            *FLAGS, "--out", str(out)])  # an update of 1e-30 leaves every float32 weight as it was
    assert code == 0, err
    assert load_decoder(str(out))[0].config.num_hidden_layers == 2
    before, after = load_file(teacher / "model.safetensors"), load_file(out / "model.safetensors")
    renamed = {name.replace("layers.1.", "layers.0.").replace("layers.3.", "layers.1."): value
               for name, value in before.items() if ".layers.0." not in name and ".layers.2." not in name}
    assert renamed.keys() == after.keys()
    for name, value in after.items():
        np.testing.assert_array_equal(value, renamed[name], err_msg=name)


def test_both_models_on_the_teachers_test_split(teacher, distilled):
    out, stdout = distilled
    rows = {m[0]: m for m in LINE.findall(stdout)}
    assert set(rows) == {"teacher", "student"}, stdout
    config = SFT.build(teacher / "config.toml")
    test = load_examples(config)[1]
    assert len(test) == 2
    for name, run in (("teacher", teacher), ("student", out)):
        model, tokenizer = load_decoder(str(run))
        _, where, layers, params, megabytes, loss, exact, answered, speed = rows[name]
        assert where == str(run) and int(layers) == model.config.num_hidden_layers
        assert int(params.replace(",", "")) == model.num_parameters()
        assert float(megabytes) == pytest.approx((run / "model.safetensors").stat().st_size / 1e6, abs=0.051)
        figures = evaluate(model, tokenizer, test, config)  # the exported model, evaluated again
        assert float(loss) == pytest.approx(figures["loss"], abs=1e-4)
        assert float(exact) == pytest.approx(100 * figures["exact_match"], abs=0.05) and int(answered) == 2
        assert float(speed) > 0
    assert (rows["teacher"][2], rows["student"][2]) == ("4", "2")


def test_run_json_and_the_commands_that_read_the_folder(teacher, distilled):
    out, _ = distilled
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "distill" and info["kind"] == "decoder" and info["steps"] == 2
    assert info["distill"]["teacher"] == str(teacher) and info["distill"]["layers"] == [0, 2]
    assert (info["distill"]["temperature"], info["distill"]["alpha"]) == (3.0, 0.7)
    assert set(info["distill"]["teacher_test"]) == set(info["after"]) >= {"loss", "exact_match"}
    code, text, err = run_cli(["generate", "--model", str(out), "--max-new-tokens", "3", "say 1"])
    assert code == 0, err
    assert isinstance(load_service(str(out)), ChatService)


def test_refusals_before_any_folder(teacher, distilled, tmp_path):
    out, _ = distilled
    target = ["--out", str(tmp_path / "s")]
    assert_user_error(run_cli(["distill", str(teacher), "--student-layers", "0,4", *target]), "student_layers",
                      "0..3")
    assert_user_error(run_cli(["distill", str(teacher), "--alpha", "2", *target]), "alpha = 2")
    assert_user_error(run_cli(["distill", str(teacher), "--batch-size", "3", "--accumulation", "2", *target]),
                      "batch_size = 3 is not divisible by accumulation = 2")
    assert_user_error(run_cli(["distill", str(teacher), "--epochs", "0", "--max-steps", "0", *target]),
                      "epochs = 0 and max_steps = 0")
    assert_user_error(run_cli(["distill", str(teacher), "--max-steps", "1", *FLAGS, "--out", str(out)]),
                      "already holds a run", "--overwrite")
    assert not (tmp_path / "s").exists()


def test_decoder_settings_are_refused_for_a_classifier_run(tiny_model, csv_data, tmp_path):
    run = tmp_path / "classifier"
    code, _, err = run_cli(["finetune", "--model", str(tiny_model), "--data", str(csv_data), "--max-length", "12",
                            "--max-steps", "1", *FLAGS, "--out", str(run)])
    assert code == 0, err
    for flag, value in (("--eval-examples", "3"), ("--gguf-dtype", "F16"), ("--accumulation", "2")):
        name = flag[2:].replace("-", "_")
        assert_user_error(run_cli(["distill", str(run), flag, value, "--out", str(tmp_path / "s")]),
                          f"{name} ({flag}) applies to decoder runs only", f"{run} is a classifier run")
    assert not (tmp_path / "s").exists()
