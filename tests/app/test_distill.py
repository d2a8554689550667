"""``tinysft distill`` on a tiny 4-layer teacher, and the student it starts from."""
import json
import re

import numpy as np
import pytest

import tinysft
from tinysft import nn
from tinysft.app.run_folder import load_run
from tinysft.finetune.distill import student_from_teacher
from tinysft.models import BertConfig, BertForSequenceClassification, BertModel

from .helpers import VOCAB, assert_user_error, run_cli

FLAGS = ["--max-steps", "4", "--batch-size", "4", "--no-progress"]
LINE = re.compile(r"^(teacher|student) (\S+): (\d+) layers, ([\d,]+) parameters, ([\d.]+) MB; "
                  r"test accuracy (\S+), macro_f1 (\S+); ([\d.]+) examples/s$", re.M)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, csv_data):
    model = tmp_path_factory.mktemp("deep_model")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=48)
    BertModel(config).save_pretrained(model)
    (model / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    run = tmp_path_factory.mktemp("teacher")
    code, _, err = run_cli(["finetune", "--model", str(model), "--data", str(csv_data), "--max-length", "12",
                            "--strategy", "full", *FLAGS, "--out", str(run), "--overwrite"])
    assert code == 0, err
    return run


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    code, stdout, err = run_cli(["distill", str(teacher), *FLAGS, "--temperature", "3", "--alpha", "0.7",
                                 "--out", str(out)])
    assert code == 0, err
    return out, stdout


def test_the_student_is_the_teacher_without_its_odd_layers():
    tinysft.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=5, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    teacher = BertForSequenceClassification(config, num_labels=3).astype(np.float64).eval()
    student = student_from_teacher(teacher).eval()
    assert student.bert.config.num_hidden_layers == 3 and student.training is False
    ids = np.random.default_rng(0).integers(0, len(VOCAB), size=(3, 7))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    with tinysft.no_grad():
        x = teacher.bert.embeddings(ids)  # the teacher's layers 0, 2, 4 alone, by hand
        bias = tinysft.functional.attention_bias(mask, x.dtype, like=x)
        for i in (0, 2, 4):
            x = teacher.bert.encoder.layer[i](x, bias=bias)
        want = teacher.head(nn.POOLINGS["mean"](x, mask)).numpy()
        got = student(ids, mask).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    student.bert.encoder.layer[1].attention.self.query.weight.data += 1.0  # a copy: the teacher is untouched
    assert not np.allclose(student.bert.encoder.layer[1].attention.self.query.weight.numpy(),
                           teacher.bert.encoder.layer[2].attention.self.query.weight.numpy())
    custom = student_from_teacher(teacher, [1, 4])
    assert custom.bert.config.num_hidden_layers == 2
    np.testing.assert_array_equal(custom.bert.encoder.layer[0].output.dense.weight.numpy(),
                                  teacher.bert.encoder.layer[1].output.dense.weight.numpy())
    for bad in ([], [2, 1], [0, 5], [1, 1]):
        with pytest.raises(ValueError, match="student layers"):
            student_from_teacher(teacher, bad)


def test_distill_prints_teacher_and_student_side_by_side(teacher, distilled):
    out, stdout = distilled
    rows = {m[0]: m for m in LINE.findall(stdout)}
    assert set(rows) == {"teacher", "student"}, stdout
    for name, run in (("teacher", teacher), ("student", out)):
        _, _, model, _ = load_run(run)
        _, where, layers, params, megabytes, accuracy, macro_f1, _ = rows[name]
        assert where == str(run) and int(layers) == model.bert.config.num_hidden_layers
        assert int(params.replace(",", "")) == model.num_parameters()
        assert float(megabytes) == pytest.approx((run / "model.safetensors").stat().st_size / 1e6, abs=0.051)
        code, text, err = run_cli(["eval", str(run)])  # both on the same test split, as eval re-creates it
        assert code == 0, err
        assert f"accuracy {accuracy}" in text and f"macro_f1 {macro_f1}" in text
    assert (rows["teacher"][2], rows["student"][2]) == ("4", "2")
    assert int(rows["student"][3].replace(",", "")) < int(rows["teacher"][3].replace(",", ""))


def test_the_student_run_folder(teacher, distilled):
    out, _ = distilled
    info = json.loads((out / "run.json").read_text())
    assert info["distill"]["layers"] == [0, 2] and info["distill"]["teacher"] == str(teacher)
    assert (info["distill"]["temperature"], info["distill"]["alpha"]) == (3.0, 0.7)
    assert info["model_dir"] == str(out / "student") and (out / "student" / "vocab.txt").is_file()
    code, text, err = run_cli(["predict", str(out), "a happy cat"])
    assert code == 0 and text.split("\t")[0] in ("animal", "feeling"), err


def test_distill_refusals(teacher, distilled, tmp_path):
    out, _ = distilled
    target = ["--out", str(tmp_path / "s")]
    assert_user_error(run_cli(["distill", str(teacher), "--student-layers", "0,4", *target]), "student_layers",
                      "0..3")
    assert_user_error(run_cli(["distill", str(teacher), "--student-layers", "two", *target]), "student_layers")
    assert_user_error(run_cli(["distill", str(teacher), "--alpha", "1.5", *target]), "alpha = 1.5")
    assert_user_error(run_cli(["distill", str(teacher), "--temperature", "0", *target]), "temperature = 0")
    assert_user_error(run_cli(["distill", str(tmp_path), *target]), "not a finished run folder")
    assert_user_error(run_cli(["distill", str(teacher), *FLAGS, "--out", str(out)]), "already holds a run")
    assert not (tmp_path / "s").exists()
