"""``tinysft predict RUN TEXT...``: the label and its probability for each text."""
from ..tensor import no_grad
from .output import say
from .run_folder import load_run


def predict(run_dir, texts) -> int:
    """Print the predicted label and its probability for each text."""
    config, info, model, tokenizer = load_run(run_dir)
    encoded = tokenizer.encode_batch(list(texts), max_length=config.max_length, padding=True, truncation=True)
    with no_grad():
        probs = model(encoded["input_ids"], encoded["attention_mask"]).softmax(-1).numpy()
    for text, row in zip(texts, probs):
        best = int(row.argmax())
        say(f"{info['label_names'][best]}\t{row[best]:.3f}\t{text}")
    return 0
