"""``tinysft sft`` through ``tinysft.app.cli.main``, on a tiny random decoder (tests/app/tiny_decoder.py).

A run of two optimizer steps on 40 WordNet examples writes the whole run folder; the tests read
it back independently: the settings from config.toml, the test loss recomputed from the exported
model, the PEFT adapters reapplied to a fresh base giving the exported merged weights, the GGUF
export loading to the same model within Q8_0's error, and ``tinysft chat RUN_DIR`` talking to it.
Then the other switches (``--full``, ``--packing``, the strategies of ``prepare`` each with its
plan printed and its frozen embedding bit-identical in the export, a JSONL file of each format with
``--train-on``, ``--show-mask``, ``--overwrite``) and a table of bad settings, each refused in one
line before any folder exists. (WordNet examples need the WordNet files: skipped without them.)
"""
import io
import json

import numpy as np
import pytest

from tinysft.app.cli import _parser
from tinysft.app.config import SFT
from tinysft.app.generate import load_decoder
from tinysft.app.sft import evaluate, load_examples
from tinysft.backend import cuda_available
from tinysft.io.peft import load_adapter
from tinysft.io.safetensors import load_file
from tinysft.models.llama import LlamaForCausalLM
from tinysft.nn.lora import merge_and_unload
from tinysft.tensor import no_grad

from .helpers import assert_user_error, has_wordnet, run_cli
from .tiny_decoder import write_tiny_decoder


needs_wordnet = pytest.mark.skipif(not has_wordnet(), reason="WordNet not installed (apt-get install wordnet-base)")
# byte-level tokens: a WordNet example is 150-300 tokens, the default system prompt alone 90
TINY_RUN = ["--max-examples", "40", "--max-steps", "2", "--batch-size", "4", "--max-length", "320",
            "--eval-examples", "6", "--no-progress"]
IDS = np.array([[1, 60, 70, 80, 90, 100, 2]])


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="module")
def run(decoder, tmp_path_factory):
    if not has_wordnet():
        pytest.skip("WordNet not installed (apt-get install wordnet-base)")
    out = tmp_path_factory.mktemp("runs") / "sft"
    result = run_cli(["sft", "--model", str(decoder), *TINY_RUN, "--out", str(out)])
    assert result[0] == 0, result[2]
    return out, result


def logits(model, ids=IDS):
    with no_grad():
        return model(ids).numpy()


@needs_wordnet
def test_the_run_prints_before_and_after_and_writes_its_folder(run, decoder):
    out, (_, stdout, _) = run
    lines = stdout.splitlines()
    assert lines[0].startswith("data: wordnet — train ") and lines[1].startswith("before: test loss ")
    assert any(line.startswith("after:  test loss ") for line in lines)
    assert f"tinysft chat {out}" in lines[-1]
    for name in ("config.toml", "run.json", "metrics.jsonl", "config.json", "model.safetensors", "model-Q8_0.gguf",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    args = _parser().parse_args(["sft", "--model", str(decoder), *TINY_RUN, "--out", str(out)])
    assert SFT.build(out / "config.toml") == SFT.build(None, SFT.overrides(args))  # config.toml reads back
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # log_every 5, and the last step
    info = json.loads((out / "run.json").read_text())
    assert info["steps"] == 2 and info["tokens_per_second"] > 0
    assert set(info["before"]) == set(info["after"]) == {"loss", "exact_match", "answered"}


@needs_wordnet
def test_the_after_figures_are_those_of_the_exported_model(run):
    out, _ = run
    config, info = SFT.build(out / "config.toml"), json.loads((out / "run.json").read_text())
    model, tokenizer = load_decoder(str(out))  # the merged model, the GGUF's tokenizer
    _, test = load_examples(config)
    again = evaluate(model, tokenizer, test[:config.eval_examples], config)
    assert again["answered"] == info["after"]["answered"]
    assert abs(again["loss"] - info["after"]["loss"]) <= 2e-4  # merged W + s·BA vs the adapters, 4 decimals
    assert again["exact_match"] == info["after"]["exact_match"]
    assert info["after"]["loss"] < info["before"]["loss"]  # two steps at lr 1e-3 lower it


@needs_wordnet
def test_the_adapters_on_a_fresh_base_give_the_merged_weights(run, decoder):
    out, _ = run
    base = LlamaForCausalLM.from_pretrained(decoder)
    load_adapter(base, out / "adapter")
    merge_and_unload(base)
    merged = load_file(out / "model.safetensors")
    adapted = {name: p.data for name, p in base.named_parameters()}
    assert adapted.keys() == merged.keys()
    for name in merged:
        np.testing.assert_allclose(adapted[name], merged[name], rtol=0, atol=1e-6, err_msg=name)
    tuned = LlamaForCausalLM.from_pretrained(out)
    assert not np.array_equal(logits(tuned), logits(LlamaForCausalLM.from_pretrained(decoder)))  # it trained


@needs_wordnet
def test_the_gguf_export_is_the_merged_model_within_q8_0(run):
    out, _ = run
    hf, gguf = LlamaForCausalLM.from_pretrained(out), LlamaForCausalLM.from_pretrained(out / "model-Q8_0.gguf")
    for (name, p), (_, q) in zip(hf.named_parameters(), gguf.named_parameters(), strict=True):
        if p.data.ndim == 2:
            d = np.abs(p.data).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # the Q8_0 step of each block
            assert np.all(np.abs(q.data - p.data).reshape(-1, 32) <= (0.5 + 127 * 2.0 ** -11) * d), name
        else:
            assert np.array_equal(p.data, q.data), name


@needs_wordnet
def test_chat_talks_to_the_tuned_model(run, monkeypatch):
    out, _ = run
    monkeypatch.setattr("sys.stdin", io.StringIO("Which WordNet category does 'cat' belong to?\n"))
    code, stdout, err = run_cli(["chat", str(out), "--max-new-tokens", "4"])
    assert code == 0, err
    assert stdout.startswith(f"chat with {out} ") and " tokens in " in err


@needs_wordnet
def test_full_fine_tuning_and_packing(decoder, tmp_path):
    out = tmp_path / "full"
    code, stdout, err = run_cli(["sft", "--model", str(decoder), *TINY_RUN, "--full", "--packing", "--lr", "1e-4",
                                 "--gguf-dtype", "F16", "--out", str(out)])
    assert code == 0, err
    assert "full fine-tuning of" in stdout and "packed rows" in stdout
    assert not (out / "adapter").exists() and (out / "model-F16.gguf").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["sizes"]["rows"] < info["sizes"]["train"]  # several examples per packed row
    base, tuned = LlamaForCausalLM.from_pretrained(decoder), LlamaForCausalLM.from_pretrained(out)
    assert not np.array_equal(base.model.embed_tokens.weight.data, tuned.model.embed_tokens.weight.data)


def chats(n):
    return [{"prompt": f"say {i}", "completion": f"number {i}"} for i in range(n)]


@pytest.mark.parametrize("strategy, fragment", [
    ("layerwise", "layerwise fine-tuning of 26,912 of 26,912 parameters; lr head 0.01, model.layers.1 0.005, "
                  "model.layers.0 0.0025, model.embed_tokens 0.00125"),
    ("frozen_embeddings", "frozen_embeddings fine-tuning of 18,592 of 26,912 parameters; lr encoder+head 0.01; "
                          "frozen: model.embed_tokens (the tied output head with it)"),
    ("discriminative", "discriminative fine-tuning of 26,912 of 26,912 parameters; per-tensor lr from the Fisher "
                       "information"),
])
def test_the_strategies_of_prepare_train_the_weights_themselves(decoder, tmp_path, strategy, fragment):
    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(r) + "\n" for r in chats(10)))
    code, stdout, err = run_cli(["sft", "--model", str(decoder), "--data", str(data), "--test-fraction", "0.2",
                                 "--strategy", strategy, "--decay", "0.5", "--lr", "1e-2", "--max-steps", "2",
                                 "--batch-size", "2", "--max-length", "256", "--no-progress", "--out", str(out)])
    assert code == 0, err
    assert fragment in stdout  # 26,912 weights: the tiny decoder's (tests/app/tiny_decoder.py)
    assert json.loads((out / "run.json").read_text())["steps"] == 2 and not (out / "adapter").exists()
    base, tuned = load_file(decoder / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == tuned.keys()
    embedding = "model.embed_tokens.weight"
    assert np.array_equal(base[embedding], tuned[embedding]) == (strategy == "frozen_embeddings")
    assert all(not np.array_equal(base[n], tuned[n]) for n in base if n != embedding)


@pytest.mark.skipif(cuda_available(), reason="CuPy and a GPU are here: the refusal needs a machine without them")
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_loaded(tmp_path):
    out = tmp_path / "run"
    assert_user_error(run_cli(["sft", "--device", "cuda", "--model", "/nonexistent/model", "--out", str(out)]),
                      "device 'cuda' requested, but no CUDA GPU is usable", "tinysft[cuda]", "device='cpu'")
    assert not out.exists()


@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU (CuPy missing or no device)")
@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_a_run_on_the_gpu_gives_the_figures_of_the_cpu_run(decoder, tmp_path, strategy):
    """No dropout, so the two runs differ by float32 rounding alone; the GPU run's export, read on
    the host, gives its after figures."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chats(10)))
    infos = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        code, stdout, err = run_cli(["sft", "--model", str(decoder), "--data", str(data), "--test-fraction", "0.2",
                                     "--strategy", strategy, "--lora-dropout", "0", "--lr", "1e-2", "--max-steps",
                                     "2", "--batch-size", "2", "--max-length", "256", "--no-progress",
                                     "--device", device, "--out", str(out)])
        assert code == 0, err
        assert f"device {device}" in stdout
        infos[device] = json.loads((out / "run.json").read_text())
    for when in ("before", "after"):
        assert abs(infos["cuda"][when]["loss"] - infos["cpu"][when]["loss"]) <= 1e-3, when
    assert infos["cuda"]["after"]["loss"] != infos["cuda"]["before"]["loss"]  # it trained
    config = SFT.build(tmp_path / "cuda" / "config.toml")
    model, tokenizer = load_decoder(str(tmp_path / "cuda"))  # on the host
    again = evaluate(model, tokenizer, load_examples(config)[1], config)
    assert abs(again["loss"] - infos["cuda"]["after"]["loss"]) <= 2e-4


@pytest.mark.parametrize("rows", [
    [{"prompt": f"say {i}", "completion": f"number {i}"} for i in range(10)],
    [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"},
                   {"role": "assistant", "content": f"hello {i}"}, {"role": "user", "content": "again"},
                   {"role": "assistant", "content": f"bye {i}"}]} for i in range(10)],
])
def test_a_jsonl_file_of_either_format(decoder, tmp_path, rows):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["sft", "--model", str(decoder), "--data", str(data), "--test-fraction", "0.2", "--max-steps", "1",
              "--batch-size", "2", "--max-length", "256", "--no-progress"]
    code, stdout, err = run_cli([*common, "--train-on", "completion", "--out", str(tmp_path / "run")])
    assert code == 0, err
    assert "train 8 examples" in stdout and "of 2 answers" in stdout  # every test example is answered
    code, stdout, _ = run_cli([*common, "--show-mask", "--train-on", "completion", "--out", str(tmp_path / "x")])
    assert code == 0 and not (tmp_path / "x").exists()
    masked = stdout.split("<|im_start|>user")
    if "messages" in rows[0]:
        assert "⟦hello" not in stdout and "⟦bye" in stdout  # the last reply only
    else:
        assert "⟦number" in stdout and len(masked) == 4  # three examples
    assert stdout.rstrip().endswith("(trained tokens between ⟦ and ⟧)")


def test_a_second_run_into_the_same_folder_needs_overwrite(decoder, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(6)))
    argv = ["sft", "--model", str(decoder), "--data", str(data), "--test-fraction", "0.5", "--max-steps", "1",
            "--batch-size", "1", "--max-length", "256", "--no-progress", "--out", str(tmp_path / "run")]
    assert run_cli(argv)[0] == 0
    assert_user_error(run_cli(argv), f"--out {tmp_path / 'run'} already holds a run", "--overwrite")
    code, _, err = run_cli([*argv, "--overwrite"])
    assert code == 0, err


@pytest.mark.parametrize("flags, fragments", [
    (["--lora-r", "0"], ["lora_r = 0 (--lora-r)", "[1, 1024]"]),
    (["--lora-r", "2.5"], ["lora_r = '2.5'"]),
    (["--lora-alpha", "0"], ["lora_alpha = 0.0 (--lora-alpha)", "> 0"]),
    (["--lora-dropout", "1"], ["lora_dropout = 1.0"]),
    (["--lora-targets", "q_proj,lm_head"], ["lora_targets = 'q_proj,lm_head'", "q_proj,k_proj"]),
    (["--lora-targets", "q_proj,q_proj"], ["lora_targets"]),
    (["--train-on", "prompts"], ["train_on = 'prompts'", "assistant, completion, all"]),
    (["--strategy", "encoder_only"], ["strategy = 'encoder_only'", "lora, full, layerwise, frozen_embeddings, "
                                                                  "discriminative"]),
    (["--decay", "0"], ["decay = 0.0 (--decay)", "(0, 1]"]),
    (["--max-length", "1"], ["max_length = 1"]),
    (["--lr", "nan"], ["lr = nan (--lr)"]),
    (["--lr=-1e-4"], ["lr = -0.0001"]),
    (["--batch-size", "6", "--accumulation", "4"], ["batch_size = 6 is not divisible by accumulation = 4"]),
    (["--epochs", "0"], ["epochs = 0 and max_steps = 0"]),
    (["--gguf-dtype", "Q4_1"], ["gguf_dtype = 'Q4_1'", "F16, Q8_0"]),
    (["--test-fraction", "1"], ["test_fraction = 1.0"]),
    (["--max-examples", "-5"], ["max_examples = -5"]),
    (["--seed", "1e20"], ["seed"]),
    (["--packing", "--max-length", "0"], ["max_length = 0"]),
    (["--data", "/nonexistent/data.jsonl"], ["/nonexistent/data.jsonl"]),
    (["--model", "/nonexistent/model"], ["/nonexistent/model"]),
])
def test_bad_settings_are_refused_before_anything_is_made(tmp_path, flags, fragments):
    out = tmp_path / "run"
    assert_user_error(run_cli(["sft", *flags, "--out", str(out)]), *fragments)
    assert not out.exists()


def test_bad_files_are_refused_naming_them(decoder, tmp_path):
    data, out = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert_user_error(run_cli(["sft", "--model", str(decoder), "--data", str(data), "--out", str(out)]),
                      f"{data}:2")
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert_user_error(run_cli(["sft", "--model", str(decoder), "--data", str(data), "--out", str(out)]),
                      "1 examples cannot be split")
    toml = tmp_path / "run.toml"
    toml.write_text("lora_r = 0\n")
    assert_user_error(run_cli(["sft", "--config", str(toml), "--out", str(out)]), f"lora_r = 0 (in {toml})")
    assert not out.exists()
