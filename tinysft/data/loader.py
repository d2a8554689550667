"""Mini-batch iteration with deterministic, resumable shuffling.

Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(n)`,
so the order depends only on (seed, epoch), never on how many batches were drawn before.
`state_dict()` records (epoch, position); a loader restored from it yields exactly the
batches the original had not yet yielded, mid-epoch included::

    loader = DataLoader(train, batch_size=32, seed=0)
    for epoch in range(3):
        for texts, labels in loader:
            ...
        save_checkpoint(dir, params, {"loader": loader.state_dict()})

The dataset is indexed example by example and the batch built by ``collate``; a
dataset with a ``gather(rows)`` method (``ArrayDataset``: in-memory arrays such as
cached features) returns the whole batch itself. The epoch counter advances when an
epoch runs to its end, or at the start of an iteration whose epoch was already used up.

Data-parallel training (``tinysft.distributed``): with ``num_replicas=W, rank=r`` each of
the W ranks draws the same epoch order and batch j of size W·batch_size, and takes its
shard ``order[j·W·B:(j+1)·W·B][r::W]``: the W shards of a batch are disjoint and make up
the batch one process with ``batch_size=W·B`` would draw, so every rank has the same
number of batches. A shard left empty (a last batch of fewer than W examples) is yielded
as ``None``. The saved position counts these global batches and the saved batch size is
W·B, so a checkpoint resumes on any W' that divides that global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..distributed import shard

__all__ = ["DataLoader", "default_collate", "tokenizing_collate"]


def default_collate(items: Sequence) -> Any:
    """Batch a list of examples: tuples/dicts field by field, strings as lists, numbers as arrays."""
    first = items[0]
    if isinstance(first, tuple):
        return tuple(default_collate(list(field)) for field in zip(*items))
    if isinstance(first, dict):
        return {k: default_collate([item[k] for item in items]) for k in first}
    if isinstance(first, str):
        return list(items)
    return np.stack([np.asarray(item) for item in items])


def tokenizing_collate(tokenizer, max_length: int) -> Callable[[list], dict]:
    """(text, label) items → {"input_ids", "attention_mask", "labels"}, padded to the batch's longest."""
    def collate(items):
        texts = [text for text, _ in items]
        encoded = tokenizer.encode_batch(texts, max_length=max_length, padding=True, truncation=True)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": np.array([label for _, label in items], dtype=np.int64)}
    return collate


class DataLoader:
    """Yield `collate([dataset[i] for i in batch])` over the remaining batches of the current epoch."""

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 collate: Callable[[list], Any] = default_collate, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..num_replicas-1, got rank {rank} of {num_replicas}")
        self.num_replicas, self.rank = num_replicas, rank
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.drop_last, self.collate = seed, drop_last, collate
        self.epoch = 0
        self.position = 0  # batches of `epoch` already yielded

    @property
    def global_batch_size(self) -> int:
        """Examples per batch over all replicas (``batch_size`` in one process)."""
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        n, size = len(self.dataset), self.global_batch_size
        return n // size if self.drop_last else -(-n // size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example indices in the order epoch `epoch` visits them."""
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[Any]:
        if self.position >= len(self):  # the previous epoch was fully consumed
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        while self.position < len(self):
            start = self.position * self.global_batch_size
            batch = shard(order[start:start + self.global_batch_size], self.num_replicas, self.rank)
            self.position += 1
            if not len(batch):
                yield None
                continue
            gather = getattr(self.dataset, "gather", None)
            yield gather(batch) if gather is not None else self.collate([self.dataset[int(i)] for i in batch])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """JSON-ready progress (a fully consumed epoch counts as the next one, at position 0)
        and the settings a resume must share (``batch_size``: the global batch)."""
        epoch, position = (self.epoch + 1, 0) if self.position >= len(self) else (self.epoch, self.position)
        return {"epoch": epoch, "position": position, "seed": self.seed, "batch_size": self.global_batch_size,
                "num_examples": len(self.dataset), "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the dataset size and settings must match."""
        mine = self.state_dict()
        mismatched = [k for k in ("seed", "batch_size", "num_examples", "shuffle", "drop_last") if state[k] != mine[k]]
        if mismatched:
            raise ValueError(f"loader state does not match this loader in {mismatched}: "
                             f"saved {[state[k] for k in mismatched]}, now {[mine[k] for k in mismatched]}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
