"""What the commands print: one line at a time, flushed, and metrics as ``name value`` pairs."""


def say(message: str) -> None:
    print(message, flush=True)


def format_metrics(metrics: dict) -> str:
    """``{"loss": 0.5, "accuracy": 0.75, "confusion": [...]}`` → "loss 0.5000, accuracy 0.7500"."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
