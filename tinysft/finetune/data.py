"""A resumable loader over in-memory arrays (cached features, synthetic data, tests).

``ArrayLoader({"x": X, "labels": y}, batch_size=32, shuffle=True, seed=0)``
yields dicts of row slices. The order of epoch e is a pure function of
``(seed, e)``, so ``state_dict()`` is just ``{"epoch", "position"}`` and a
loader restored from it continues with exactly the batches the original would
have produced next, mid-epoch included::

    it = iter(loader); next(it); saved = loader.state_dict()
    other = ArrayLoader(arrays, 32, shuffle=True, seed=0); other.load_state_dict(saved)
    list(other) == list(it)       # the same remaining batches

Same contract as ``tinysft.data.DataLoader`` (which builds batches example by
example through a collate function; this one slices whole arrays): the epoch
counter advances when an epoch runs to its end, or at the start of an
iteration whose epoch was already used up.
"""
import numpy as np

__all__ = ["ArrayLoader"]


class ArrayLoader:
    """Batches of rows of equal-length arrays; ``drop_last`` drops a short last batch."""

    def __init__(self, arrays: dict, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {len(v) for v in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays must share their first dimension, got lengths "
                             f"{ {k: len(v) for k, v in self.arrays.items()} }")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n = lengths.pop()
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch, self.position = 0, 0  # position: batches of this epoch already yielded

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self):
        if self.position >= len(self):  # the previous epoch was fully consumed
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.position < len(self):
            rows = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            self.position += 1
            yield {k: v[rows] for k, v in self.arrays.items()}
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
