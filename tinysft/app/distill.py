"""``tinysft distill TEACHER_RUN``: a shallower student trained on a finished run's soft targets.

The student starts as ``finetune.distill.student_from_teacher`` builds it: the teacher's
embeddings, its encoder layers ``--student-layers`` (by default every other one, as
DistilBERT: 0, 2, 4 of MiniLM's 6) and its head. It trains on the teacher's training split
with

    loss = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) · CE(z_s, y)

(``finetune.distill.kd_loss``; ``--temperature`` T, ``--alpha`` α), every weight at ``--lr``,
early stopping and the schedule as the teacher's run had them. Then both models run on the
teacher's test split, and a line for each gives its layers, parameters, size on disk, test
accuracy and macro-F1 and its inference speed (examples/s, batches of 64, no gradient).

The student's folder is a run folder like any other (``tinysft eval``, ``predict``,
``serve`` and ``ensemble`` read it); its backbone, a model folder with config.json,
model.safetensors and the teacher's vocabulary, is ``student/`` inside it, and run.json
records the teacher, the layers, T and α under ``distill``.
"""
import dataclasses
import shutil
import time
from pathlib import Path

from ..finetune import prepare
from ..finetune.distill import DistillationLoss, every_other_layer, student_from_teacher
from ..finetune.metrics import classification_metrics
from ..optim import NO_DECAY
from .config import FINETUNE, ConfigError, Setting, Settings
from .ensemble import split_logits
from .output import say
from .run_folder import FRESH, INFO, METRICS, WEIGHTS, begin_run, clear, load_run, start, write_run

STUDENT = "student"  # the student's model folder inside its run folder
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")

DISTILL = Settings("distill", [
    Setting("student_layers", str, "every-other", "the teacher's encoder layers the student's layers start as, "
                                                  "such as 0,2,4 ('every-other': 0, 2, 4, ...)"),
    Setting("temperature", float, 2.0, "temperature T of the soft targets", minimum=0, exclusive=True),
    Setting("alpha", float, 0.5, "weight α of the soft term: α·T²·KL + (1−α)·CE", minimum=0, maximum=1),
    dataclasses.replace(FINETUNE["lr"], default=1e-4, help="learning rate of every student weight"),
    FINETUNE["epochs"], FINETUNE["max_steps"], FINETUNE["batch_size"], FINETUNE["weight_decay"],
    FINETUNE["schedule"], FINETUNE["warmup_ratio"], FINETUNE["clip"], FINETUNE["log_every"],
    dataclasses.replace(FINETUNE["out"], default="runs/distilled"),
    FINETUNE["progress"],
])


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


def distill_command(teacher_dir, settings, overwrite: bool = False) -> int:
    """Distil the run in ``teacher_dir`` into a student run in ``settings.out``; print both side by side."""
    from .finetune import build_loaders, build_optimizer, build_trainer, load_splits
    started = time.perf_counter()
    teacher_config, info, teacher, tokenizer = load_run(teacher_dir)
    layers = student_layers(settings.student_layers, teacher.bert.config.num_hidden_layers)
    out = Path(settings.out)
    config = dataclasses.replace(  # the student run's settings: the teacher's data, split and model shape
        teacher_config, model=str(out / STUDENT), out=str(out), strategy="full", head_lr=settings.lr,
        accumulation=1, penalty="none", penalty_lambda=0.0, gradual_unfreeze=False, checkpoint_every=0,
        **{name: getattr(settings, name) for name in ("lr", "epochs", "max_steps", "batch_size", "weight_decay",
                                                       "schedule", "warmup_ratio", "clip", "log_every",
                                                       "progress")})
    if config.epochs == 0 and config.max_steps == 0:
        raise ConfigError("epochs = 0 and max_steps = 0: set either to a positive number")
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
