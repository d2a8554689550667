"""Bad settings and bad files, table by table, through ``tinysft.app.cli.main``.

Every case must exit with status 2 and print one line, ``tinysft: error: ...``, that
names the setting (and its value) or the file, and leave no run folder behind:

- settings out of range or of the wrong type, each given as a flag and again as a
  TOML key (NaN and ±inf included), refused before the model is even located;
- settings that are fine alone but not together;
- config files, data files (CSV, JSON lines), model folders (config.json, vocab.txt)
  that are not UTF-8, not well-formed, too deeply nested, or lack what is needed;
- run folders whose run.json or config.toml is spoilt, for ``eval`` and ``predict``.

Plus: a non-finite loss mid-training is one line naming the step; ``eval`` on a data
file whose labels changed names the label, its line and run.json.
"""
import json
import math
import shutil
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinysft.app.finetune as finetune_module
from tinysft.app.cli import main
from tinysft.app.config import FINETUNE, ConfigError, Setting, Settings

from .helpers import assert_user_error, csv_rows, run_cli, write_tiny_model


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as locating the model."""
    def locate_model(*_):
        raise AssertionError("a bad setting was refused only after the model was located")
    monkeypatch.setattr(finetune_module, "locate_model", locate_model)


def finetune_args(model, data, out, *flags):
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
            "--max-steps", "3", "--batch-size", "4", "--max-length", "12", "--strategy", "full", *flags]


# ----------------------------------------------------------------------- one setting at a time

BAD_VALUES = [  # (setting, value as typed on the command line)
    ("lr", "nan"), ("lr", "inf"), ("lr", "-inf"), ("lr", "-1e-4"), ("lr", "0"), ("lr", "fast"), ("lr", "1e400"),
    ("head_lr", "-0.001"), ("head_lr", "nan"), ("head_lr", "0"),
    ("clip", "-1"), ("clip", "nan"), ("clip", "inf"),
    ("weight_decay", "-0.01"), ("weight_decay", "inf"),
    ("checkpoint_every", "-1"), ("checkpoint_every", "2.5"), ("checkpoint_every", "often"),
    ("patience", "-1"), ("min_delta", "-1"), ("min_delta", "nan"),
    ("warmup_ratio", "1.5"), ("warmup_ratio", "1"), ("warmup_ratio", "-0.1"),
    ("max_steps", "-3"), ("max_steps", "1e30.5"),
    ("max_length", "1"), ("max_length", "2"), ("max_length", "0"), ("max_length", "-40"),
    ("max_examples", "-5"), ("max_examples", "many"),
    ("epochs", "-1"), ("epochs", "3.5"), ("epochs", "inf"),
    ("batch_size", "0"), ("batch_size", "-4"), ("accumulation", "0"),
    ("decay", "0"), ("decay", "1.5"), ("decay", "nan"),
    ("momentum", "1"), ("momentum", "-0.5"),
    ("dropout", "1"), ("dropout", "-0.1"),
    ("val_fraction", "0"), ("val_fraction", "1"), ("val_fraction", "nan"), ("test_fraction", "1.2"),
    ("penalty_lambda", "-1"), ("penalty_lambda", "nan"),
    ("seed", "-1"), ("seed", str(2**32)), ("seed", "1.5"),
    ("log_every", "0"),
    ("strategy", "everything"), ("optimizer", "adamx"), ("schedule", "step"), ("penalty", "l3"),
    ("pooling", "max2"), ("device", "tpu"),
    ("model", ""), ("data", ""), ("out", ""), ("out", "a\0b"),
]


def _toml_value(setting: Setting, text: str) -> str:
    """``text`` as a TOML value of its own type: numbers, nan and inf as TOML literals, the rest quoted."""
    if setting.kind is not str:
        try:
            tomllib.loads(f"x = {text}")
            return text
        except tomllib.TOMLDecodeError:
            pass
    return json.dumps(text)


def _shown(setting: Setting, text: str) -> str:
    """How the error shows the value: a number as Python prints it, anything else as given."""
    try:
        value = float(text)
    except ValueError:
        return text
    if setting.kind is float or not math.isfinite(value) or value != int(value):
        return str(value) if setting.kind is float else text
    return str(int(value))


@pytest.mark.parametrize("name, text", BAD_VALUES)
def test_a_bad_flag_is_refused_before_anything_is_loaded(tmp_path, no_model_load, name, text):
    setting = FINETUNE[name]
    out = tmp_path / "run"
    argv = ["finetune", f"{setting.flag}={text}"] + ([] if name == "out" else ["--out", str(out)])
    line = assert_user_error(run_cli(argv), f"{name} = ", f"({setting.flag})")
    assert _shown(setting, text).replace("\0", "") in line.replace("\\x00", "")
    assert ("allowed: " + setting.allowed() in line) or ("expected " + setting.allowed() in line)
    assert not out.exists()


@pytest.mark.parametrize("name, text", BAD_VALUES)
def test_a_bad_toml_key_is_refused_naming_the_file(tmp_path, no_model_load, name, text):
    setting = FINETUNE[name]
    config = tmp_path / "run.toml"
    config.write_text(f"{name} = {_toml_value(setting, text)}\n")
    out = tmp_path / "run"
    argv = ["finetune", "--config", str(config)] + ([] if name == "out" else ["--out", str(out)])
    assert_user_error(run_cli(argv), f"{name} = ", f"(in {config})", setting.allowed())
    assert not out.exists()


NUMBERS = [s for s in FINETUNE if s.kind in (int, float)]


@given(setting=st.sampled_from(NUMBERS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70)))
def test_a_number_is_taken_only_inside_its_range(setting, value):
    """Any number, as typed (repr) or as a TOML value: accepted exactly when it is finite, of the
    setting's type and inside its bounds; otherwise a ConfigError naming the setting."""
    inside = (math.isfinite(value) and (setting.kind is float or float(value).is_integer())
              and (setting.minimum is None or value > setting.minimum
                   or (value == setting.minimum and not setting.exclusive))
              and (setting.maximum is None or value < setting.maximum
                   or (value == setting.maximum and not setting.exclusive_max)))
    for given_as in (repr(value), value):
        try:
            config = FINETUNE.build(overrides={setting.name: given_as})
        except ConfigError as error:
            own = str(error).startswith(f"{setting.name} = ") and ("): allowed: " in str(error)
                                                                  or "): expected " in str(error))
            assert own != inside, error  # a value inside its range meets only the joint checks
            continue
        assert inside, (setting.name, given_as)
        assert getattr(config, setting.name) == value and type(getattr(config, setting.name)) is setting.kind


def test_an_out_that_is_a_file(tmp_path, no_model_load):
    (tmp_path / "run").write_text("not a folder")
    assert_user_error(run_cli(["finetune", "--out", str(tmp_path / "run")]), "--out", "is a file")


@pytest.mark.parametrize("toml, fragments", [
    ("epochs = true\n", ["epochs = True", "expected an integer"]),
    ("epochs = 2.5\n", ["epochs = 2.5"]),
    ("lr = [0.1]\n", ["lr = [0.1]"]),
    ("lr = 1979-05-27\n", ["lr = datetime.date(1979, 5, 27)"]),
    ("[lr]\nvalue = 1\n", ["lr = {'value': 1}"]),
    ('progress = "maybe"\n', ["progress = 'maybe'", "true or false"]),
    ("model = 5\n", ["model = 5", "a non-empty text"]),
    ("learning_rate = 0.1\n", ["unknown setting(s) learning_rate", "run.toml"]),
])
def test_toml_values_of_the_wrong_type(tmp_path, no_model_load, toml, fragments):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    assert_user_error(run_cli(["finetune", "--config", str(config), "--out", str(tmp_path / "run")]), *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--batch-size", "10", "--accumulation", "3"], ["batch_size = 10", "accumulation = 3"]),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"], ["val_fraction + test_fraction = 1"]),
    (["--epochs", "0", "--max-steps", "0"], ["epochs = 0", "max_steps = 0"]),
    (["--penalty-lambda", "0.1"], ["penalty_lambda = 0.1", "needs a penalty"]),
])
def test_settings_that_do_not_fit_together(tmp_path, no_model_load, flags, fragments):
    assert_user_error(run_cli(["finetune", *flags, "--out", str(tmp_path / "run")]), *fragments)
    assert not (tmp_path / "run").exists()


def test_every_setting_is_a_flag_with_its_range_in_the_help(capsys):
    with pytest.raises(SystemExit) as done:  # argparse exits after printing the help
        main(["finetune", "--help"])
    assert done.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    for setting in FINETUNE:
        assert setting.flag in flat and " ".join(setting.allowed().split()) in flat, setting.name


# ----------------------------------------------------------------------- the table API a command uses

def test_a_command_declares_its_own_table():
    table = Settings("sft", [
        Setting("lora_r", int, 8, "LoRA rank", minimum=1),
        Setting("train_on", str, "assistant", "tokens with a loss", choices=("assistant", "completion", "all")),
        Setting("packing", bool, False, "pack examples"),
        FINETUNE["seed"],
    ], checks=[lambda c: "lora_r must be even" if c.lora_r % 2 else None])
    config = table.build(overrides={"lora_r": "16", "packing": True})
    assert (config.lora_r, config.train_on, config.packing, config.seed) == (16, "assistant", True, 0)
    assert config.to_dict() == {"lora_r": 16, "train_on": "assistant", "packing": True, "seed": 0}
    with pytest.raises(ConfigError, match=r"lora_r = 0 \(--lora-r\): allowed: an integer ≥ 1"):
        table.build(overrides={"lora_r": "0"})
    with pytest.raises(ConfigError, match="lora_r must be even"):
        table.build(overrides={"lora_r": "3"})
    with pytest.raises(ConfigError, match="train_on = 'prompt'"):
        table.build(overrides={"train_on": "prompt"})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) lr"):
        table.build(overrides={"lr": "1"})


def test_a_table_refuses_its_own_mistakes():
    with pytest.raises(ConfigError, match="r = 0"):
        Setting("r", int, 0, "rank", minimum=1)  # a default outside its own range
    with pytest.raises(ValueError, match="declared twice"):
        Settings("x", [FINETUNE["lr"], FINETUNE["lr"]])
    with pytest.raises(TypeError, match="kind"):
        Setting("shape", tuple, (), "a tuple")


# ----------------------------------------------------------------------- bad files

def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


NESTED = "[" * 100_000 + "]" * 100_000
GOOD_CSV = "\n".join(csv_rows()) + "\n"

BAD_DATA = [  # (file name, contents, fragments of the message besides the file's name)
    ("latin1.csv", GOOD_CSV.encode() + b"caf\xe9,animal\n", ["line 42", "byte 0xe9 is not UTF-8"]),
    ("ff.csv", b"text,label\n\xff\xfe,animal\n", ["line 2", "byte 0xff"]),
    ("empty_label.csv", GOOD_CSV + "a cat,\n", ["line 42", "empty label"]),
    ("blank_label.csv", GOOD_CSV + "a cat,   \n", ["line 42", "empty label"]),
    ("short_row.csv", GOOD_CSV + "a cat\n", ["line 42", "too few fields"]),
    ("no_label_column.csv", "text,class\na cat,animal\n", ["missing column(s) ['label']"]),
    ("empty.csv", "", ["the file is empty"]),
    ("header.csv", "text,label\n", ["no examples found"]),
    ("latin1.jsonl", b'{"text": "caf\xe9", "label": "a"}\n', ["line 1", "not UTF-8"]),
    ("bad.jsonl", '{"text": "a cat", "label": "animal"}\n{"text": \n', ["line 2", "invalid JSON"]),
    ("nested.jsonl", NESTED + "\n", ["line 1"]),
    ("list.jsonl", '["a cat", "animal"]\n', ["line 1", "expected a JSON object"]),
    ("no_label.jsonl", '{"text": "a cat"}\n', ["line 1", "missing key(s) ['label']"]),
    ("null_label.jsonl", '{"text": "a cat", "label": null}\n', ["line 1", "'label'", "None"]),
    ("list_label.jsonl", '{"text": "a cat", "label": ["a"]}\n', ["line 1", "'label'"]),
    ("bool_label.jsonl", '{"text": "a cat", "label": true}\n', ["line 1", "'label'"]),
    ("empty_label.jsonl", '{"text": "a cat", "label": ""}\n', ["line 1", "'label'"]),
    ("number_text.jsonl", '{"text": 5, "label": "a"}\n', ["line 1", "'text' must be a string"]),
    ("huge_int.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n", ["line 1"]),
    ("data.txt", "text,label\n", ["expected 'wordnet'"]),
]


@pytest.mark.parametrize("name, contents, fragments", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_a_bad_data_file_is_one_line_naming_it(tiny_model, tmp_path, name, contents, fragments):
    data = _write(tmp_path / name, contents)
    out = tmp_path / "run"
    assert_user_error(run_cli(finetune_args(tiny_model, data, out)), name, *fragments)
    assert not out.exists()


def test_data_too_small_to_split_or_with_one_label(tiny_model, tmp_path):
    few = _write(tmp_path / "few.csv", "text,label\na cat,animal\na sad feeling,feeling\n")
    out = tmp_path / "run"
    assert_user_error(run_cli(finetune_args(tiny_model, few, out)), "few.csv", "split is empty")
    one = _write(tmp_path / "one.csv", "\n".join(r for r in csv_rows() if not r.endswith(",feeling")) + "\n")
    assert_user_error(run_cli(finetune_args(tiny_model, one, out)), "one.csv", "single label 'animal'")
    assert not out.exists()


BAD_CONFIG_FILES = [  # (contents of run.toml, fragments besides the file's name)
    (b"lr = 0.1\n# caf\xe9\n", ["line 2", "not UTF-8"]),
    ("lr = \n", ["is not valid TOML"]),
    ("x = " + NESTED + "\n", ["is not valid TOML"]),
    ('lr = "1e-3\n', ["is not valid TOML"]),
]


@pytest.mark.parametrize("contents, fragments", BAD_CONFIG_FILES)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, no_model_load, contents, fragments):
    config = _write(tmp_path / "run.toml", contents)
    assert_user_error(run_cli(["finetune", "--config", str(config), "--out", str(tmp_path / "run")]),
                      str(config), *fragments)
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_missing_or_a_folder(tmp_path, no_model_load):
    assert_user_error(run_cli(["finetune", "--config", str(tmp_path / "nope.toml")]), "nope.toml", "does not exist")
    assert_user_error(run_cli(["finetune", "--config", str(tmp_path)]), str(tmp_path), "cannot be read")


BAD_MODEL_FILES = [  # (file in the model folder, how to spoil it, fragments besides the file's name)
    ("config.json", b'{"hidden_size": \xff}', ["not UTF-8"]),
    ("config.json", "{not json", ["invalid JSON"]),
    ("config.json", NESTED, ["nested too deeply"]),
    ("config.json", "[1, 2]", ["expected a JSON object"]),
    ("config.json", {"hidden_size": "8"}, ["hidden_size = '8'", "an integer"]),
    ("config.json", {"hidden_size": 8.5}, ["hidden_size = 8.5", "an integer"]),
    ("config.json", {"hidden_size": True}, ["hidden_size = True"]),
    ("config.json", {"num_attention_heads": 0}, ["num_attention_heads = 0", "at least 1"]),
    ("config.json", {"num_attention_heads": 3}, ["not a multiple"]),
    ("config.json", {"layer_norm_eps": "small"}, ["layer_norm_eps = 'small'", "a finite number"]),
    ("config.json", {"hidden_act": "swish2"}, ["swish2"]),
    ("config.json", {"hidden_act": None}, ["hidden_act = None", "a string"]),
    ("config.json", {"max_position_embeddings": 8}, ["max_length = 12", "at most 8"]),
    ("vocab.txt", b"[PAD]\n\xff\n", ["line 2", "not UTF-8"]),
    ("tokenizer_config.json", '{"do_lower_case": ', ["invalid JSON"]),
]


@pytest.mark.parametrize("name, spoil, fragments", BAD_MODEL_FILES)
def test_a_bad_model_folder_is_one_line_naming_the_file(csv_data, tmp_path, name, spoil, fragments):
    model = write_tiny_model(tmp_path / "model")
    if isinstance(spoil, dict):  # overwrite some fields of a valid config.json
        spoil = json.dumps({**json.loads((model / name).read_text()), **spoil})
    _write(model / name, spoil)
    out = tmp_path / "run"
    assert_user_error(run_cli(finetune_args(model, csv_data, out)), name, *fragments)
    assert not out.exists()


# ----------------------------------------------------------------------- runs: spoilt folders, changed data

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, csv_data):
    run = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = run_cli(finetune_args(tiny_model, csv_data, run))
    assert code == 0, err
    return run


def _spoilt_copy(run, tmp_path, name, spoil):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    if callable(spoil):
        spoil = spoil(json.loads((copy / name).read_text()))
    _write(copy / name, spoil if isinstance(spoil, (str, bytes)) else json.dumps(spoil))
    return copy


def _without(key):
    return lambda info: {k: v for k, v in info.items() if k != key}


def _with(**changes):
    return lambda info: {**info, **changes}


BAD_RUN_FILES = [  # (file in the run folder, how to spoil it, fragments besides the file's name)
    ("run.json", "{", ["invalid JSON"]),
    ("run.json", b'{"model_dir": "\xff"}', ["not UTF-8"]),
    ("run.json", "[]", ["expected a JSON object"]),
    ("run.json", _without("model_dir"), ["missing key 'model_dir'"]),
    ("run.json", _without("label_names"), ["missing key 'label_names'"]),
    ("run.json", _without("num_labels"), ["missing key 'num_labels'"]),
    ("run.json", _with(model_dir=7), ["model_dir = 7", "a string"]),
    ("run.json", _with(label_names="animal"), ["label_names = 'animal'", "a list"]),
    ("run.json", _with(label_names=["a", "a"]), ["distinct strings"]),
    ("run.json", _with(label_names=[1, 2]), ["distinct strings"]),
    ("run.json", _with(num_labels=3), ["num_labels = 3"]),
    ("run.json", _with(num_labels="2"), ["num_labels = '2'", "an integer"]),
    ("config.toml", "lr = nan\n", ["lr = nan", "allowed"]),
    ("config.toml", b"lr = 0.1\n\xff\n", ["line 2", "not UTF-8"]),
    ("config.toml", "unknown_key = 1\n", ["unknown setting(s) unknown_key"]),
]


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("name, spoil, fragments", BAD_RUN_FILES)
def test_a_spoilt_run_folder_is_one_line_naming_the_file(finished_run, tmp_path, command, name, spoil, fragments):
    copy = _spoilt_copy(finished_run, tmp_path, name, spoil)
    argv = [command, str(copy)] + (["a small cat"] if command == "predict" else [])
    assert_user_error(run_cli(argv), name, *fragments)


@pytest.mark.parametrize("name, spoil, fragments", [("config.json", '{"hidden_size": "eight"}', ["hidden_size = 'eight'"]),
                                                     ("vocab.txt", b"[PAD]\n\xff\n", ["line 2", "not UTF-8"])])
def test_a_spoilt_model_folder_of_a_run(finished_run, tiny_model, tmp_path, name, spoil, fragments):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    copy = _spoilt_copy(finished_run, tmp_path, "run.json", _with(model_dir=str(model)))
    _write(model / name, spoil)
    for argv in (["eval", str(copy)], ["predict", str(copy), "a cat"]):
        assert_user_error(run_cli(argv), name, *fragments)


@pytest.mark.parametrize("change, label, line", [
    (lambda rows: [r.replace(",feeling", ",emotion") for r in rows], "emotion", 3),  # a label renamed
    (lambda rows: rows + ["a small bird,bird"], "bird", 42),                          # a label added
])
def test_eval_names_a_label_the_run_never_saw(finished_run, csv_data, tmp_path, change, label, line):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    changed = _write(tmp_path / "changed.csv", "\n".join(change(csv_rows())) + "\n")
    config = (copy / "config.toml").read_text().replace(json.dumps(str(csv_data)), json.dumps(str(changed)))
    (copy / "config.toml").write_text(config)
    assert_user_error(run_cli(["eval", str(copy)]), "changed.csv", f"line {line}", f"unknown label '{label}'",
                      "run.json")


def test_eval_uses_the_run_label_order(finished_run, tmp_path):
    """Label i is run.json's label_names[i], not the data file's sorted order: with the two
    names swapped in run.json, every verdict on the (unchanged) test split flips."""
    copy = _spoilt_copy(finished_run, tmp_path, "run.json", lambda info: info)
    code, out, err = run_cli(["eval", str(copy)])
    assert code == 0, err
    swapped = _spoilt_copy(finished_run, tmp_path / "swapped", "run.json",
                           _with(label_names=["feeling", "animal"]))
    code, swapped_out, err = run_cli(["eval", str(swapped)])
    assert code == 0, err
    accuracy = float(out.split("accuracy ")[1].split(",")[0])
    swapped_accuracy = float(swapped_out.split("accuracy ")[1].split(",")[0])
    assert swapped_accuracy == pytest.approx(1 - accuracy, abs=1e-4)  # two classes: every verdict flips


def test_a_non_finite_loss_is_one_line_naming_the_step(tiny_model, csv_data, tmp_path):
    out = tmp_path / "run"
    flags = ["--lr", "1e300", "--head-lr", "1e300", "--optimizer", "sgd", "--momentum", "0", "--clip", "0",
             "--weight-decay", "0", "--log-every", "1"]
    line = assert_user_error(run_cli(finetune_args(tiny_model, csv_data, out, *flags)), "training stopped at step",
                             "became", "--lr", "--overwrite")
    step = int(line.split("at step ")[1].split(" ")[0])
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step))  # the log holds the steps that were applied, and no more
