"""A few data-parallel steps of a tiny BERT classifier, run by the tests under ``mpirun`` (or alone).

    mpirun -n 2 python tests/distributed/train_tiny.py --batch 4 --out DIR
    python tests/distributed/train_tiny.py --batch 8 --out DIR          # the same run in one process

Each rank writes ``DIR/rank<r>.npz`` (its final weights) and ``DIR/rank<r>.json`` (the
evaluation history). ``--batch`` is the per-rank batch; some labels are ignored (-100)
so the ranks' counts differ and only the global count gives one process's loss.
``--stop-rank R --stop-at S`` makes rank R stop itself (SIGSTOP: hung) or die (SIGKILL)
when it starts step S, for the tests of a dead rank.
"""
import argparse
import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from tests.finetune.helpers import loader, tiny_bert, token_data  # noqa: E402
from tinysft import distributed as dist  # noqa: E402
from tinysft.data import ArrayDataset, DataLoader  # noqa: E402
from tinysft.finetune import EarlyStopping, Trainer, get_weights  # noqa: E402
from tinysft.optim import SGD  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True, help="examples per rank per micro-batch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--signal", choices=("STOP", "KILL"), default="KILL")
    args = parser.parse_args(argv)

    rank, world = dist.init()
    model = tiny_bert(seed=rank)  # different on purpose: the Trainer starts every rank from rank 0's weights
    train = DataLoader(ArrayDataset(token_data(n=30, seed=1, ignored=7)), batch_size=args.batch, shuffle=True,
                       seed=3, num_replicas=world, rank=rank)
    val = DataLoader(ArrayDataset(token_data(n=13, seed=2)), batch_size=6 // world, shuffle=False,
                     num_replicas=world, rank=rank)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]
    # SGD: linear in the gradients, so the all-reduce's round-off stays round-off. (Adam divides by
    # √v: on the attention key biases, whose exact gradient is 0, it turns round-off into steps of lr.)
    optimizer = SGD(groups, lr=0.5, momentum=0.9, weight_decay=0.01)
    stopper = StopAt(args.stop_rank, args.stop_at, getattr(signal, "SIG" + args.signal))
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(model, optimizer, train, eval_loader=val, max_steps=args.steps, epochs=args.epochs,
                      max_grad_norm=0.5, num_classes=3, early_stopping=EarlyStopping(patience=1, metric="loss"),
                      callbacks=[stopper], log_path=os.path.join(args.out, "metrics.jsonl"), log_every=1,
                      checkpoint_dir=os.path.join(args.out, "checkpoint") if args.checkpoint_every else None,
                      checkpoint_every=args.checkpoint_every, progress=False)
    history = trainer.fit()
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **get_weights(model))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"history": history, "step": trainer.step, "world": world}, f)


class StopAt:
    """Sends ``sig`` to this process at the end of step ``step - 1`` on rank ``rank``."""

    def __init__(self, rank, step, sig):
        self.rank, self.step, self.sig = rank, step, sig

    def on_step_end(self, trainer, record):
        if self.rank == dist.rank() and record["step"] == self.step - 1:
            os.kill(os.getpid(), self.sig)


if __name__ == "__main__":
    main()
