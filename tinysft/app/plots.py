"""PNG plots of a run folder's ``metrics.jsonl`` (needs matplotlib, the ``plot`` extra).

loss.png            training loss per step; validation loss and accuracy per epoch
learning_rate.png   learning rate of every parameter group per step
update_ratio.png    ‖Δθ‖/‖θ‖ per layer group per step (log scale)
"""
import json
from pathlib import Path

PLOTS = ("loss.png", "learning_rate.png", "update_ratio.png")  # in the order above


def read_metrics(path):
    """(train records, eval records) from a metrics.jsonl file."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        (evals if record.get("event") == "eval" else train).append(record)
    return train, evals


def plot_run(run_dir) -> list:
    """Write the plots into ``run_dir``; returns their paths ([] without matplotlib or metrics)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in train]
    written = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(run_dir / name, dpi=110)
        plt.close(figure)
        written.append(run_dir / name)

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(steps, [r["loss"] for r in train], lw=1, label="train (per step)")
    if evals:
        loss_axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
        accuracy_axis.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="accuracy")
        accuracy_axis.plot([r["step"] for r in evals], [r["macro_f1"] for r in evals], "s--", label="macro-F1")
    loss_axis.set(xlabel="step", ylabel="cross-entropy", title="loss")
    accuracy_axis.set(xlabel="step", ylabel="score", title="validation", ylim=(0, 1))
    loss_axis.legend()
    accuracy_axis.legend()
    save(figure, PLOTS[0])

    for key, name, title, log in (("lr", PLOTS[1], "learning rate per group", False),
                                  ("update_ratio", PLOTS[2], "‖Δθ‖/‖θ‖ per layer group", True)):
        # a ".no_decay" twin shares its group's rate; plotting it would hide the other lines
        groups = sorted({g for r in train for g in r.get(key, {}) if not g.endswith(".no_decay")})
        if not groups:
            continue
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for group in groups:
            axis.plot([r["step"] for r in train if group in r.get(key, {})],
                      [r[key][group] for r in train if group in r.get(key, {})], lw=1, label=group)
        axis.set(xlabel="step", title=title, yscale="log" if log else "linear")
        axis.legend(fontsize=7, ncol=2)
        save(figure, name)
    return written
