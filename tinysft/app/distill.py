"""``tinysft distill TEACHER_RUN``: a shallower student trained on a finished run's soft targets.

The student starts as ``finetune.distill.student_from_teacher`` builds it: the teacher's
embeddings, its layers ``--student-layers`` (by default every other one, as DistilBERT:
0, 2, 4 of MiniLM's 6; 0, 2, ..., 28 of SmolLM2-135M's 30) and its head. It trains on the
teacher's training split with

    loss = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y)

(``--temperature`` T, ``--alpha`` α), every weight at ``--lr``, the teacher in eval mode
under no_grad. Then both models run on the teacher's test split, and a line for each gives
its layers, parameters, size on disk, test figures and speed.

A classifier run (``tinysft finetune``): ``finetune.distill.kd_loss`` on each example's
logits, early stopping and the schedule as the teacher's run had them; test accuracy,
macro-F1 and examples/s (batches of 64, no gradient). The student's folder is a run folder
like any other (``tinysft eval``, ``predict``, ``serve`` and ``ensemble`` read it); its
backbone, a model folder with config.json, model.safetensors and the teacher's vocabulary,
is ``student/`` inside it.

A decoder run (``tinysft sft``: run.json's "command" is "sft"): the training split is the
teacher run's own, rebuilt from its config.toml with its seed (``sft.load_examples``), and
the loss is ``finetune.distill.linear_kd_loss`` over the vocabulary at the supervised
positions only (labels ≠ ignore_index, the SFT loss's one-position shift), a step's sum
divided by the supervised tokens of the whole step. The test figures are ``sft.evaluate``'s
(loss per supervised token, exact match); the speed is the forward's tokens/s (the test
loss's forward, no gradient, over the first ``SPEED_EXAMPLES`` test examples). The student's
folder holds config.toml, run.json, metrics.jsonl and the student as config.json +
model.safetensors and as GGUF with the teacher's tokenizer, so ``tinysft chat``,
``generate --model`` and ``serve`` read it.

run.json records the teacher, the layers, T and α under ``distill``. Settings that belong
to one kind of run (``DECODER_ONLY``) are refused for the other, and every setting is
checked before any work starts or any folder is created.
"""
import dataclasses
import json
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np

from .. import rng
from ..data.loader import DataLoader
from ..data.sft import encode_examples, pack_examples, sft_collate
from ..finetune import prepare
from ..finetune.causal_lm import evaluate_sft
from ..finetune.distill import DistillationLoss, every_other_layer, student_from_teacher
from ..finetune.metrics import classification_metrics
from ..io.atomic import atomic_write_text
from ..models.export import export_gguf, save_pretrained, tokenizer_metadata
from ..models.llama import LlamaConfig
from ..optim import NO_DECAY, param_groups_with_decay
from .config import (FINETUNE, SFT, ConfigError, Setting, Settings, _accumulation_divides_batch, _has_a_length,
                     to_toml)
from .ensemble import split_logits
from .files import read_json
from .generate import decoder_paths, load_decoder
from .output import say
from .plots import plot_run
from .run_folder import CONFIG, FRESH, INFO, METRICS, WEIGHTS, begin_run, clear, load_run, start, write_run

STUDENT = "student"  # a classifier student's model folder inside its run folder
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
CLASSIFIER, DECODER = "classifier", "decoder"
SPEED_EXAMPLES = 32  # test examples a decoder's forward speed is timed on

# a decoder run's own defaults. Sized for minutes on two CPU cores with SmolLM2-135M: a step of 8
# WordNet questions (~500 tokens) costs the teacher's forward and the 15-layer student's forward,
# backward and AdamW update, 16-20 s of CPU time (measured), so 20 steps are ~6 CPU-minutes
DECODER_DEFAULTS = {"weight_decay": 0.0, "schedule": "cosine", "warmup_ratio": 0.05, "epochs": 1,
                    "max_steps": 20, "batch_size": 8, "out": "runs/distilled-sft"}
DECODER_ONLY = ("accumulation", "eval_examples", "gguf_dtype")


def _for_decoders(setting: Setting) -> Setting:
    """The flag's help with the decoder runs' default or restriction appended."""
    if setting.name in DECODER_ONLY:
        return dataclasses.replace(setting, help=f"decoder runs only: {setting.help}")
    if setting.name in DECODER_DEFAULTS:
        default = DECODER_DEFAULTS[setting.name]
        return dataclasses.replace(setting, help=f"{setting.help} (a decoder run's default: {default})")
    return setting


DISTILL = Settings("distill", [_for_decoders(s) for s in [
    Setting("student_layers", str, "every-other", "the teacher's layers the student's layers start as, "
                                                  "such as 0,2,4 ('every-other': 0, 2, 4, ...)"),
    Setting("temperature", float, 2.0, "temperature T of the soft targets", minimum=0, exclusive=True),
    Setting("alpha", float, 0.5, "weight α of the soft term: α·T²·KL + (1−α)·CE", minimum=0, maximum=1),
    dataclasses.replace(FINETUNE["lr"], default=1e-4, help="learning rate of every student weight"),
    FINETUNE["epochs"], FINETUNE["max_steps"], FINETUNE["batch_size"], FINETUNE["weight_decay"],
    FINETUNE["schedule"], FINETUNE["warmup_ratio"], FINETUNE["clip"], FINETUNE["log_every"],
    SFT["accumulation"],
    Setting("eval_examples", int, 0, "test examples both models are evaluated on", minimum=0,
            zero="as many as the teacher's run evaluated"),
    SFT["gguf_dtype"],
    dataclasses.replace(FINETUNE["out"], default="runs/distilled"),
    FINETUNE["progress"],
]], checks=[_has_a_length, _accumulation_divides_batch])

KIND_SETTINGS = {  # each kind's table: its settings and defaults
    CLASSIFIER: Settings("distill", [s for s in DISTILL if s.name not in DECODER_ONLY], checks=[_has_a_length]),
    DECODER: Settings("distill", [dataclasses.replace(s, default=DECODER_DEFAULTS[s.name])
                                  if s.name in DECODER_DEFAULTS else s for s in DISTILL], checks=DISTILL.checks),
}
TRAINING = ("lr", "epochs", "max_steps", "batch_size", "weight_decay", "schedule", "warmup_ratio", "clip",
            "log_every", "progress")  # the student's optimisation settings: the distill flags, not the teacher's


def run_kind(run_dir) -> str:
    """CLASSIFIER (a ``tinysft finetune`` run) or DECODER (``tinysft sft``, or a distilled decoder)."""
    path = Path(run_dir) / INFO
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder: {INFO} is missing "
                                "(make one with 'tinysft finetune --out DIR' or 'tinysft sft --out DIR')")
    info = read_json(path)
    return DECODER if info.get("command") == "sft" or info.get("kind") == DECODER else CLASSIFIER


def distill_settings(kind: str, overrides: dict, teacher_dir):
    """The settings of a distill run of ``kind`` from the flags given; ConfigError naming a setting
    that belongs to the other kind, or one whose value is not allowed."""
    table = KIND_SETTINGS[kind]
    for name in overrides:
        if name in DISTILL.settings and name not in table.settings:
            other = next(k for k, t in KIND_SETTINGS.items() if name in t.settings)
            raise ConfigError(f"{name} ({DISTILL[name].flag}) applies to {other} runs only: {teacher_dir} is a "
                              f"{kind} run")
    return table.build(None, overrides)


def distill_command(teacher_dir, overrides: dict, overwrite: bool = False) -> int:
    """Distil the run in ``teacher_dir`` (a classifier or a decoder run) with the flags ``overrides``."""
    kind = run_kind(teacher_dir)
    settings = distill_settings(kind, overrides, teacher_dir)
    return (distill_decoder if kind == DECODER else distill_classifier)(teacher_dir, settings, overwrite)


def student_layers(text: str, teacher_layers: int) -> list:
    """``--student-layers`` as a list of the teacher's layer numbers; ConfigError naming the setting."""
    if text == "every-other":
        return every_other_layer(teacher_layers)
    try:
        layers = [int(part, 10) for part in text.split(",")]
    except ValueError:
        layers = None
    if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < teacher_layers:
        raise ConfigError(f"student_layers = {text!r} (--student-layers): allowed: increasing layer numbers of the "
                          f"teacher's 0..{teacher_layers - 1}, such as 0,2,4, or 'every-other'")
    return layers


def distill_classifier(teacher_dir, settings, overwrite: bool = False) -> int:
    """Distil the classifier run in ``teacher_dir`` into a student run in ``settings.out``; print both."""
    from .finetune import build_loaders, build_optimizer, build_trainer, load_splits
    started = time.perf_counter()
    teacher_config, info, teacher, tokenizer = load_run(teacher_dir)
    layers = student_layers(settings.student_layers, teacher.bert.config.num_hidden_layers)
    out = Path(settings.out)
    config = dataclasses.replace(  # the student run's settings: the teacher's data, split and model shape
        teacher_config, model=str(out / STUDENT), out=str(out), strategy="full", head_lr=settings.lr,
        accumulation=1, penalty="none", penalty_lambda=0.0, gradual_unfreeze=False, checkpoint_every=0,
        **{name: getattr(settings, name) for name in TRAINING})
    how = start(out, config, overwrite=overwrite)
    _, (train, val, test) = load_splits(teacher_config, label_names=info["label_names"])
    student = student_from_teacher(teacher, layers)
    student.to(config.device)
    train_loader, val_loader, test_loader = build_loaders(config, tokenizer, train, val, test)
    plan = prepare(student, "full", config.lr, weight_decay=config.weight_decay, no_decay=NO_DECAY)
    optimizer = build_optimizer(config, plan.param_groups)
    say(f"distill: teacher {teacher_dir} ({teacher.bert.config.num_hidden_layers} layers) → student of its layers "
        f"{', '.join(map(str, layers))}; T = {settings.temperature:g}, α = {settings.alpha:g}; "
        f"train {len(train)}, validation {len(val)}, test {len(test)}")
    if how == FRESH:
        clear(out)
    begin_run(out, config)
    loss_fn = DistillationLoss(teacher, settings.temperature, settings.alpha)
    trainer = build_trainer(config, plan, optimizer, train_loader, val_loader, len(info["label_names"]), out,
                            loss_fn=loss_fn)
    trainer.fit()
    train_seconds = time.perf_counter() - started

    write_student_folder(student, Path(info["model_dir"]), out / STUDENT)
    rows = {name: split_figures(model, tokenizer, config.max_length, test, len(info["label_names"]))
            for name, model in (("teacher", teacher), ("student", student.eval()))}
    write_run(out, config, student, {
        "model_dir": str(out / STUDENT), "label_names": info["label_names"], "num_labels": info["num_labels"],
        "sizes": {"train": len(train), "validation": len(val), "test": len(test)},
        "steps": trainer.step, "seconds": round(train_seconds, 1), "test": rows["student"]["metrics"],
        "examples_per_second": round(trainer.step * config.batch_size / train_seconds, 2),
        "dropout_per_layer": student.bert.encoder.dropout_rates(),
        "distill": {"teacher": str(teacher_dir), "layers": layers, "temperature": settings.temperature,
                    "alpha": settings.alpha, "teacher_test": rows["teacher"]["metrics"]},
    })
    for name, run_dir, model in (("teacher", Path(teacher_dir), teacher), ("student", out, student)):
        row, megabytes = rows[name], (run_dir / WEIGHTS).stat().st_size / 1e6
        say(f"{name} {run_dir}: {model.bert.config.num_hidden_layers} layers, {model.num_parameters():,} parameters, "
            f"{megabytes:.1f} MB; test accuracy {row['metrics']['accuracy']:.4f}, macro_f1 "
            f"{row['metrics']['macro_f1']:.4f}; {row['examples_per_second']:.1f} examples/s")
    say(f"run folder: {out} ({trainer.step} steps in {train_seconds:.0f} s; {INFO}, {METRICS}, {STUDENT}/)")
    return 0


def split_figures(model, tokenizer, max_length: int, test, num_classes: int) -> dict:
    """``{"metrics": accuracy and macro-F1 on ``test``, "examples_per_second": inference speed}``."""
    started = time.perf_counter()
    logits, labels = split_logits(model.eval(), tokenizer, max_length, test)
    seconds = time.perf_counter() - started
    return {"metrics": classification_metrics(logits, labels, num_classes),
            "examples_per_second": len(labels) / seconds}


def write_student_folder(student, teacher_model_dir: Path, folder: Path) -> None:
    """The student's backbone as a model folder (config.json, model.safetensors) with the teacher's vocabulary."""
    student.bert.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (teacher_model_dir / name).is_file():
            shutil.copyfile(teacher_model_dir / name, folder / name)


# --------------------------------------------------------------------------- decoder runs

def distill_decoder(teacher_dir, settings, overwrite: bool = False) -> int:
    """Distil the decoder run in ``teacher_dir`` (see the module docstring); print both side by side."""
    from .sft import (build_trainer, encode_train, evaluate, format_figures, gguf_name, load_examples, pad_id,
                      remove, run_files)
    started = time.perf_counter()
    teacher_dir, out = Path(teacher_dir), Path(settings.out)
    teacher_config = SFT.build(teacher_dir / CONFIG)
    _, tokenizer_path = decoder_paths(str(teacher_dir))  # the run's own GGUF export
    layers = student_layers(settings.student_layers, LlamaConfig.from_json(teacher_dir).num_hidden_layers)
    config = dataclasses.replace(  # the student run's settings: the teacher's data and split, its own training
        teacher_config, model=str(teacher_dir), tokenizer=str(tokenizer_path), strategy="full", out=str(out),
        accumulation=settings.accumulation, gguf_dtype=settings.gguf_dtype,
        eval_examples=settings.eval_examples or teacher_config.eval_examples,
        **{name: getattr(settings, name) for name in TRAINING})
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    present = [name for name in run_files(config) if (out / name).exists()]
    if present and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(present)}): pass --overwrite to replace "
                          "it, or choose another --out")
    rng.manual_seed(config.seed)
    train_examples, test_examples = load_examples(config)
    teacher, tokenizer = load_decoder(str(teacher_dir), str(tokenizer_path))
    train, _ = encode_train(tokenizer, train_examples, config)
    rows = pack_examples(train, config.max_length) if config.packing else train
    loader = DataLoader(rows, config.batch_size // config.accumulation, shuffle=True, seed=config.seed,
                        collate=partial(sft_collate, pad_id=pad_id(teacher)))
    evaluated = test_examples[:config.eval_examples or None]
    student = student_from_teacher(teacher, layers)
    say(f"distill: teacher {teacher_dir} ({teacher.config.num_hidden_layers} layers) → student of its layers "
        f"{', '.join(map(str, layers))}; T = {settings.temperature:g}, α = {settings.alpha:g}; train "
        f"{len(train)} examples, test {len(test_examples)} ({len(evaluated)} evaluated); {config.batch_size} per "
        f"step, lr {config.lr:g}")

    for name in present:  # --overwrite: the old run goes only once the new one has loaded
        remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG, to_toml(config.to_dict()))
    student.requires_grad_(True)
    trainer, progress = build_trainer(student, param_groups_with_decay(student.named_parameters(), config.weight_decay),
                                      config, loader, out, DistillationLoss(teacher, settings.temperature, settings.alpha))
    train_started = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - train_started
    progress.close()

    save_pretrained(student, out)
    export_gguf(student, out / gguf_name(config), tokenizer_metadata(tokenizer_path), config.gguf_dtype,
                name=f"{teacher_dir.name} distilled by tinysft distill ({len(layers)} layers)")
    figures = {name: {**evaluate(model.eval(), tokenizer, evaluated, config),
                      "forward_tokens_per_second": round(forward_speed(model, tokenizer, evaluated, config), 1)}
               for name, model in (("teacher", teacher), ("student", student))}
    seconds = time.perf_counter() - started
    atomic_write_text(out / INFO, json.dumps({
        "command": "distill", "kind": DECODER, "model": str(teacher_dir), "tokenizer": str(tokenizer_path),
        "sizes": {"train": len(train), "rows": len(rows), "test": len(test_examples), "evaluated": len(evaluated)},
        "after": figures["student"], "steps": trainer.step, "train_seconds": round(train_seconds, 1),
        "seconds": round(seconds, 1), "tokens_per_second": round(progress.tokens / train_seconds, 1),
        "distill": {"teacher": str(teacher_dir), "layers": layers, "temperature": settings.temperature,
                    "alpha": settings.alpha, "teacher_test": figures["teacher"]},
    }, indent=2) + "\n")
    plot_run(out)
    for name, run_dir, model in (("teacher", teacher_dir, teacher), ("student", out, student)):
        row = figures[name]
        say(f"{name} {run_dir}: {model.config.num_hidden_layers} layers, {model.num_parameters():,} parameters, "
            f"{(run_dir / WEIGHTS).stat().st_size / 1e6:.1f} MB; {format_figures(row)}; forward "
            f"{row['forward_tokens_per_second']:.1f} tokens/s")
    say(f"run folder: {out} ({trainer.step} steps in {train_seconds:.0f} s, {progress.tokens / train_seconds:.0f} "
        f"tokens/s; {seconds:.0f} s in all; the student as config.json + model.safetensors and {gguf_name(config)})")
    say(f"talk to it: tinysft chat {out}")
    return 0


def forward_speed(model, tokenizer, examples, config) -> float:
    """Tokens/s of the no-gradient forward of the test loss (hidden states, then the head at the
    supervised positions) over the first ``SPEED_EXAMPLES`` of ``examples``, in the test's batches."""
    from .sft import EVAL_BATCH, pad_id
    encoded, _ = encode_examples(tokenizer, examples[:SPEED_EXAMPLES], config.train_on, config.max_length)
    batches = [sft_collate(encoded[i:i + EVAL_BATCH], pad_id(model)) for i in range(0, len(encoded), EVAL_BATCH)]
    started = time.perf_counter()
    evaluate_sft(model, batches)
    return sum(int(np.asarray(b["attention_mask"]).sum()) for b in batches) / (time.perf_counter() - started)
