"""Feature extraction: a frozen backbone's pooled features, computed once, cached, and a
head trained on them alone.

    plan = prepare(model, "feature_extraction", lr=1e-3)
    train = plan.features(train_loader, shuffle=True, cache="cache/train.safetensors")
    dev = plan.features(dev_loader, cache="cache/dev.safetensors")
    Trainer(plan.model, AdamW(plan.param_groups), train, eval_loader=dev, epochs=20).fit()

Features are computed in eval mode (no dropout) under ``no_grad``, kept in
memory, and, given ``cache=path``, written to a safetensors file whose metadata
holds a fingerprint (SHA-256) of the backbone's weights; a later run with the
same weights loads the file instead of running the backbone, and a file made
with other weights is recomputed. The head sees each example's cached feature
vector, so its own dropout (if any) still acts during training.
"""
import hashlib
import os

import numpy as np

from ..backend import to_device
from ..tensor import Tensor, no_grad
from .batch import labels_of, split_batch
from ..data import ArrayDataset, DataLoader

__all__ = ["FeatureExtractor", "HeadModel", "find_head_and_backbone"]

_HEAD_NAMES = ("classifier", "head", "score", "lm_head")


class HeadModel:
    """The part of a model trained on cached features: ``HeadModel(head)(features=X) == head(X)``.

    Parameters keep the names they have in the full model when ``prefix`` is
    given (``classifier.weight``), so the head's state dict loads back into it.
    """

    def __init__(self, head, prefix: str = ""):
        self.head, self.prefix = head, prefix
        self.training = True

    def __call__(self, features=None, **_):
        x = features if isinstance(features, Tensor) else Tensor(np.asarray(features))
        return self.head(x)

    def named_parameters(self):
        for name, p in self.head.named_parameters():
            yield (f"{self.prefix}.{name}" if self.prefix else name), p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def train(self, mode: bool = True):
        self.training = bool(mode)
        if hasattr(self.head, "train"):
            self.head.train(mode)
        return self

    def eval(self):
        return self.train(False)


def find_head_and_backbone(model, head=None, backbone=None):
    """``(HeadModel, backbone)``: ``head``/``backbone`` as given, else found on the model.

    The model may offer ``feature_extraction_parts() -> (head module, backbone fn)``;
    otherwise the head is its attribute ``classifier`` (or ``head``, ``score``)
    and the backbone its method ``features(**inputs)`` (pooled features).
    """
    prefix = ""
    if (head is None or backbone is None) and hasattr(model, "feature_extraction_parts"):
        found_head, found_backbone = model.feature_extraction_parts()
        head, backbone = head or found_head, backbone or found_backbone
    if head is None:
        for name in _HEAD_NAMES:
            if getattr(model, name, None) is not None and hasattr(getattr(model, name), "named_parameters"):
                head, prefix = getattr(model, name), name
                break
    elif hasattr(model, "named_modules"):
        prefix = next((n for n, m in model.named_modules() if m is head), "")
    if backbone is None and hasattr(model, "features"):
        backbone = model.features
    if head is None or backbone is None:
        raise ValueError("feature_extraction: pass head= (the module trained on the features) and backbone= "
                         "(a function from batch inputs to pooled features), or give the model a "
                         "'classifier' attribute and a 'features' method")
    if isinstance(head, HeadModel):
        return head, backbone
    return HeadModel(head, prefix), backbone


class FeatureExtractor:
    """Runs ``backbone`` once per example and caches the result (memory, optionally disk)."""

    def __init__(self, backbone, model=None, exclude=()):
        self.backbone, self.model = backbone, model
        self.exclude = set(exclude)  # ids of parameters that are not the backbone's (the head)
        self._memory = {}

    def fingerprint(self) -> str:
        """SHA-256 of the backbone's parameter names, dtypes, shapes and bytes."""
        h = hashlib.sha256()
        if self.model is not None:
            for name, p in self.model.named_parameters():
                if id(p) in self.exclude:
                    continue
                arr = np.ascontiguousarray(to_device(p.data, "cpu"))
                h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
                h.update(arr.tobytes())
        return h.hexdigest()

    def extract(self, loader, cache: str | os.PathLike | None = None) -> dict:
        """``{"features": (N, D), "labels": (N,)}`` over one pass of ``loader``.

        Pass a loader that does not shuffle if the order matters to you; the
        loader returned by ``loader()`` shuffles the cached rows itself. The
        loader's position (``state_dict``) is restored afterwards.
        """
        key = os.fspath(cache) if cache is not None else id(loader)
        if key in self._memory:
            return self._memory[key]
        fingerprint = self.fingerprint() if cache is not None else None
        if cache is not None and os.path.exists(cache):
            from ..io.safetensors import SafetensorsFile
            with SafetensorsFile(cache) as f:
                if f.metadata.get("fingerprint") == fingerprint:
                    self._memory[key] = {"features": f.get("features").copy(), "labels": f.get("labels").copy()}
                    return self._memory[key]
        features, labels = [], []
        model = self.model
        was_training = getattr(model, "training", False)
        position = loader.state_dict() if hasattr(loader, "state_dict") else None
        if model is not None:
            model.eval()
        try:
            with no_grad():
                for batch in loader:
                    inputs, _ = split_batch(batch)
                    out = self.backbone(**inputs) if isinstance(inputs, dict) else self.backbone(inputs)
                    features.append(np.asarray(out.numpy() if isinstance(out, Tensor) else out))
                    labels.append(labels_of(batch))
        finally:
            if model is not None:
                model.train(was_training)
            if position is not None:  # leave the loader where it was
                loader.load_state_dict(position)
        result = {"features": np.concatenate(features), "labels": np.concatenate(labels)}
        if cache is not None:
            from ..io.safetensors import save_file
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            save_file(result, cache, metadata={"fingerprint": fingerprint})
        self._memory[key] = result
        return result

    def loader(self, loader, batch_size: int | None = None, shuffle: bool = False, seed: int = 0,
               cache=None) -> DataLoader:
        """A ``DataLoader`` over the cached ``{"features", "labels"}`` of ``loader``'s examples."""
        data = self.extract(loader, cache=cache)
        batch_size = batch_size or getattr(loader, "batch_size", None) or 32
        return DataLoader(ArrayDataset(data), batch_size=batch_size, shuffle=shuffle, seed=seed)
