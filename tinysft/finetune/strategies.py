"""Fine-tuning strategies: one switch, ``prepare(model, strategy, lr, ...)``, that freezes
what the strategy keeps fixed and returns the parameter groups to optimise.

    plan = prepare(model, "layerwise", lr=2e-5, decay=0.9)
    opt = AdamW(plan.param_groups, lr=2e-5)
    Trainer(plan.model, opt, train_loader, on_epoch_start=plan.on_epoch_start, ...).fit()

Layers. A model is cut into layer groups, bottom to top: the embeddings, one
group per transformer block, and ``head``, which holds everything else (the
pooler, if used, and the task classifier). For tinysft's BERT the groups are
those of ``tinysft.models.bert.layer_groups``: ``bert.embeddings``,
``bert.encoder.layer.0`` ... ``bert.encoder.layer.{L-1}``, ``head``. A model with a
``layer_groups()`` method gives its own: tinysft's Llama decoder
(``LlamaForCausalLM.layer_groups``) has ``model.embed_tokens``, ``model.layers.0`` ...
``model.layers.{L-1}`` and ``head`` (the final norm, and ``lm_head`` when it is not tied).
A *tied* output head (SmolLM2's) is the embedding matrix itself: one Parameter, listed once,
in the embeddings group. For other models names are read: a parameter with a name component starting with
``embed`` is in ``embeddings``, one under ``layer.{i}`` / ``layers.{i}`` /
``h.{i}`` / ``blocks.{i}`` is in ``layer.{i}``, the rest is ``head``. The
*depth* of a group counts from the top: head 0, top block 1, ..., embeddings
L + 1. ``prepare`` first makes every parameter trainable, then freezes what the
strategy keeps fixed.

Strategies (every group dict has ``name``, ``params`` and ``lr``):

full
    Every parameter trained at ``lr``; one group named ``all``.
encoder_only
    The embeddings (word, position, token-type embeddings and their LayerNorm)
    are frozen: ``requires_grad = False``, so they get no gradient and stay
    bit-identical. The encoder blocks, the pooler and the new task head are
    trained at ``lr``; one group named ``encoder+head``. On a decoder it freezes
    the token embedding; with a tied head that is the output head as well, so of
    ``head`` only the final norm trains.
layerwise
    Layer-wise learning-rate decay: the group at depth d gets
    ``lr · decay**d`` (head ``lr``, top block ``lr·decay``, ..., embeddings
    ``lr·decay**(L+1)``), one group per layer, named as above (a tied output
    head learns at the embeddings' rate, the lowest). With
    ``gradual_unfreeze=True`` only the head is trainable in epoch 0 and one more
    group, from the top down, is unfrozen every ``unfreeze_every`` epochs
    (ULMFiT); the Trainer calls ``plan.on_epoch_start(epoch)``.
discriminative
    Per-tensor learning rates from the diagonal empirical Fisher information on
    task batches. With L_b the mean loss of batch b (model in eval mode, so no
    dropout; the mean over the batch's ``count_fn`` positions, e.g. the
    supervised next tokens of a causal LM) and B batches::

        F_j   = (1/B) Σ_b (∂L_b/∂θ_j)²                  for every scalar weight j
        I_t   = mean of F_j over the weights j of tensor t
        s_t   = clip(I_t / max_t' I_t', min_scale, 1)   (normalize="max", the default)
        lr_t  = lr · s_t

    ``normalize="mean"`` divides by the mean of I over the tensors instead (so
    tensors more important than average are capped at 1). If every I_t is 0,
    every s_t is 1. Each tensor is its own group, named after the parameter.
    The tensors the task loss is most sensitive to move fastest.
feature_extraction
    The whole backbone is frozen. Pooled features are computed once, under
    ``no_grad`` and in eval mode, and cached (``plan.features(loader, cache=path)``);
    only the head is trained on them (``plan.model`` is the head alone). See
    ``features.py``.

Each strategy is one function (``_full`` ... ``_feature_extraction``) registered in
``STRATEGIES``; ``prepare`` checks the options against the chosen one's signature.

``weight_decay`` (if given) is written into every group; ``no_decay`` (e.g.
``tinysft.optim.NO_DECAY``) splits each group in two, the second, named
``<group>.no_decay``, with weight decay 0 for the matching parameter names.
"""
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_device
from ..optim.groups import is_exempt
from .batch import count_examples, cross_entropy_sum

__all__ = ["STRATEGIES", "FinetunePlan", "prepare", "layer_groups", "fisher_diagonal",
           "discriminative_scales", "GradualUnfreezer"]

_EMBED = re.compile(r"(^|\.)embed")
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")


# ----------------------------------------------------------------------------- layer groups

def layer_groups(model) -> list:
    """``[(group name, [(param name, param), ...]), ...]`` bottom (embeddings) to top (head).

    Empty groups are left out. See the module docstring for how names are read.
    """
    named = list(model.named_parameters())
    provided = _model_layer_groups(model, named)
    if provided is not None:
        return provided
    embeddings, blocks, head = [], {}, []
    for name, p in named:
        block = _BLOCK.search(name)
        if block:
            blocks.setdefault(int(block.group(1)), []).append((name, p))
        elif _EMBED.search(name):
            embeddings.append((name, p))
        else:
            head.append((name, p))
    groups = [("embeddings", embeddings)] + [(f"layer.{i}", blocks[i]) for i in sorted(blocks)] + [("head", head)]
    return [(g, ps) for g, ps in groups if ps]


def _model_layer_groups(model, named):
    """The model's own grouping (its ``layer_groups()`` method, normalised, or
    ``tinysft.models.bert.layer_groups`` for tinysft's BERT); None if it has none."""
    helper = getattr(model, "layer_groups", None)
    if helper is None:
        try:
            from ..models.bert import BertForSequenceClassification, BertModel
            from ..models.bert import layer_groups as bert_layer_groups
        except ImportError:  # the strategies work without tinysft.models: names are read instead
            return None
        if isinstance(model, (BertModel, BertForSequenceClassification)):
            return bert_layer_groups(model, named=True)
        return None
    groups = helper()
    by_id = {id(p): name for name, p in named}
    items = groups.items() if isinstance(groups, dict) else enumerate(groups)
    out = []
    for key, members in items:
        if isinstance(members, tuple) and len(members) == 2 and isinstance(members[0], str) \
                and not hasattr(members[1], "data"):
            key, members = members  # (group name, members)
        pairs = []
        for m in members:
            if isinstance(m, tuple):
                pairs.append(m)
            elif isinstance(m, str):
                pairs.append((m, dict(named)[m]))
            else:
                pairs.append((by_id[id(m)], m))
        out.append((str(key), pairs))
    return out


# ----------------------------------------------------------------------------- the plan

@dataclass
class FinetunePlan:
    """What ``prepare`` decided; ``param_groups`` go to the optimizer, ``model`` to the Trainer."""

    strategy: str
    model: object
    param_groups: list
    layers: list                     # layer groups, bottom to top, as ``layer_groups`` returns them
    frozen: list = field(default_factory=list)      # names of parameters frozen now
    scales: dict = field(default_factory=dict)      # group name -> lr / base lr
    unfreezer: "GradualUnfreezer | None" = None
    extractor: object = None         # a FeatureExtractor for feature_extraction

    def on_epoch_start(self, epoch: int) -> None:
        """Gradual unfreezing (a no-op for the other strategies); idempotent."""
        if self.unfreezer is not None:
            self.unfreezer.apply(epoch)

    def layer_of(self) -> dict:
        """``{param name: layer group name}``, for per-layer logging."""
        return {name: g for g, members in self.layers for name, _ in members}

    def features(self, loader, **kwargs):
        """feature_extraction only: a ``DataLoader`` over cached features (see FeatureExtractor.loader)."""
        if self.extractor is None:
            raise ValueError(f"plan.features() is for strategy 'feature_extraction', not {self.strategy!r}")
        return self.extractor.loader(loader, **kwargs)


def prepare(model, strategy: str = "full", lr: float = 2e-5, *, weight_decay: float | None = None,
            no_decay=None, **options) -> FinetunePlan:
    """Freeze and group ``model``'s parameters for ``strategy`` (see the module docstring).

    ``options`` are the strategy's own (each strategy is one function below):
    layerwise: ``decay``, ``gradual_unfreeze``, ``unfreeze_every``.
    discriminative: ``fisher_loader`` (task batches), ``fisher_batches`` (default: all),
    ``min_scale``, ``normalize`` ("max" or "mean"), ``loss_fn(model, batch) -> summed loss``,
    ``count_fn(batch) -> the positions that loss sums over``, ``ignore_index``.
    feature_extraction: ``head`` (the module trained on features) and ``backbone``
    (``backbone(batch inputs) -> features``); found on the model when omitted.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    build = STRATEGIES[strategy]
    accepted = [name for name in inspect.signature(build).parameters][3:]  # after (model, layers, lr)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"prepare: strategy {strategy!r} takes no option {', '.join(unknown)}"
                        f" (its options: {', '.join(accepted) or 'none'})")
    layers = layer_groups(model)
    named = _all_params(layers)
    _set_trainable(named, True)
    plan = build(model, layers, lr, **options)
    plan.param_groups = _finish_groups(plan.param_groups, {id(p): n for n, p in named} |
                                       {id(p): n for n, p in plan.model.named_parameters()},
                                       weight_decay, no_decay)
    return plan


def _all_params(layers):
    return [(n, p) for _, members in layers for n, p in members]


def _full(model, layers, lr) -> FinetunePlan:
    """Every parameter at ``lr``, one group ``all``."""
    params = [p for _, p in _all_params(layers)]
    return FinetunePlan("full", model, [_group("all", params, lr)], layers, scales={"all": 1.0})


def _encoder_only(model, layers, lr) -> FinetunePlan:
    """The embeddings frozen; everything else at ``lr``, one group ``encoder+head``."""
    named = _all_params(layers)
    embeddings = [m for g, members in layers if _EMBED.search(g) for m in members]
    if not embeddings:
        raise ValueError("encoder_only: found no embedding parameters (no name with a component starting "
                         f"with 'embed'); names look like {[n for n, _ in named[:4]]}")
    _set_trainable(embeddings, False)
    trained = [p for _, p in named if p.requires_grad]
    return FinetunePlan("encoder_only", model, [_group("encoder+head", trained, lr)], layers,
                        frozen=[n for n, _ in embeddings], scales={"encoder+head": 1.0})


def _layerwise(model, layers, lr, decay: float = 0.9, gradual_unfreeze: bool = False,
               unfreeze_every: int = 1) -> FinetunePlan:
    """The group at depth d at ``lr · decay**d``; optionally unfrozen from the top, epoch by epoch."""
    if not 0 < decay <= 1:
        raise ValueError(f"layerwise: decay must be in (0, 1], got {decay}")
    top_down = layers[::-1]
    scales = {g: decay ** depth for depth, (g, _) in enumerate(top_down)}
    groups = [_group(g, [p for _, p in members], lr * scales[g]) for g, members in top_down]
    unfreezer = GradualUnfreezer(top_down, every=unfreeze_every) if gradual_unfreeze else None
    plan = FinetunePlan("layerwise", model, groups, layers, scales=scales, unfreezer=unfreezer)
    plan.on_epoch_start(0)
    plan.frozen = [n for n, p in _all_params(layers) if not p.requires_grad]
    return plan


def _discriminative(model, layers, lr, fisher_loader=None, fisher_batches: int | None = None,
                    min_scale: float = 0.1, normalize: str = "max", loss_fn: Callable | None = None,
                    count_fn: Callable | None = None, ignore_index: int = -100) -> FinetunePlan:
    """One group per tensor at ``lr · s_t``, s_t from the diagonal Fisher information."""
    if fisher_loader is None:
        raise ValueError("discriminative: pass fisher_loader=, the task batches that estimate the Fisher information")
    fisher = fisher_diagonal(model, fisher_loader, num_batches=fisher_batches, loss_fn=loss_fn,
                             count_fn=count_fn, ignore_index=ignore_index)
    scales = discriminative_scales(fisher, min_scale=min_scale, normalize=normalize)
    groups = [_group(n, [p], lr * scales[n]) for n, p in _all_params(layers)]
    return FinetunePlan("discriminative", model, groups, layers, scales=scales)


def _feature_extraction(model, layers, lr, head=None, backbone=None) -> FinetunePlan:
    """The backbone frozen; the head alone trained on cached features (``plan.features``)."""
    from .features import FeatureExtractor, find_head_and_backbone
    named = _all_params(layers)
    head_model, backbone = find_head_and_backbone(model, head, backbone)
    head_ids = {id(p) for _, p in head_model.named_parameters()}
    frozen = [(n, p) for n, p in named if id(p) not in head_ids]
    _set_trainable(frozen, False)
    params = [p for _, p in head_model.named_parameters()]
    return FinetunePlan("feature_extraction", head_model, [_group("head", params, lr)], layers,
                        frozen=[n for n, _ in frozen], scales={"head": 1.0},
                        extractor=FeatureExtractor(backbone, model, exclude=head_ids))


STRATEGIES = {"full": _full, "encoder_only": _encoder_only, "layerwise": _layerwise,
              "discriminative": _discriminative, "feature_extraction": _feature_extraction}


def _group(name, params, lr):
    return {"name": name, "params": list(params), "lr": float(lr)}


def _set_trainable(named, flag):
    for _, p in named:
        p.requires_grad = flag
        if not flag:
            p.grad = None


def _finish_groups(groups, names_by_id, weight_decay, no_decay):
    """Add weight decay, split off no-decay parameters (``optim.groups.is_exempt``), drop empty groups."""
    out = []
    for group in groups:
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        if no_decay:
            exempt = [p for p in group["params"] if is_exempt(names_by_id[id(p)], no_decay)]
            if exempt:
                exempt_ids = {id(p) for p in exempt}
                group["params"] = [p for p in group["params"] if id(p) not in exempt_ids]
                out.append(group)
                group = dict(group, name=group["name"] + ".no_decay", params=exempt, weight_decay=0.0)
        out.append(group)
    return [g for g in out if g["params"]]


# ----------------------------------------------------------------------------- gradual unfreezing

class GradualUnfreezer:
    """ULMFiT's gradual unfreezing over layer groups listed top (head) first.

    In epoch e the top ``1 + e // every`` groups are trainable and the rest are
    frozen (``requires_grad = False``, gradient dropped). A function of the
    epoch only, so it resumes correctly from a checkpoint.
    """

    def __init__(self, top_down_groups, every: int = 1):
        if every < 1:
            raise ValueError(f"unfreeze_every must be >= 1, got {every}")
        self.groups, self.every = top_down_groups, every

    def trainable_groups(self, epoch: int) -> int:
        return min(len(self.groups), 1 + epoch // self.every)

    def apply(self, epoch: int) -> None:
        k = self.trainable_groups(epoch)
        for i, (_, members) in enumerate(self.groups):
            _set_trainable(members, i < k)


# ----------------------------------------------------------------------------- Fisher information

def fisher_diagonal(model, loader, num_batches: int | None = None, loss_fn=None, ignore_index: int = -100,
                    count_fn=None) -> dict:
    """``{name: F}``, F = mean over batches of the squared gradient of the batch's mean loss.

    Runs in eval mode (no dropout) over the trainable parameters; gradients are
    cleared before and after, and the model's mode and the loader's position
    (``state_dict``) are restored, so the training loader can be passed. ``loss_fn(model,
    batch)`` returns the loss *summed* over the batch's labelled positions
    (default: cross-entropy); it is divided by their count, ``count_fn(batch)`` (default: the
    labels other than ``ignore_index``; for a causal LM, ``causal_lm.count_supervised``).
    """
    loss_fn = loss_fn or (lambda m, b: cross_entropy_sum(m, b, ignore_index=ignore_index))
    count_fn = count_fn or (lambda b: count_examples(b, ignore_index))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    was_training = getattr(model, "training", True)
    model.eval()
    fisher = {n: np.zeros(p.shape, dtype=np.float64) for n, p in named}
    seen = 0
    position = loader.state_dict() if hasattr(loader, "state_dict") else None
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            for _, p in named:
                p.grad = None
            count = count_fn(batch)
            if count == 0:
                continue
            (loss_fn(model, batch) * (1.0 / count)).backward()
            for n, p in named:
                if p.grad is not None:
                    g = np.asarray(to_device(p.grad, "cpu"), dtype=np.float64)
                    fisher[n] += g * g
            seen += 1
    finally:
        for _, p in named:
            p.grad = None
        model.train(was_training)
        if position is not None:
            loader.load_state_dict(position)
    if seen == 0:
        raise ValueError("fisher_diagonal: the loader gave no batch with a labelled example")
    return {n: f / seen for n, f in fisher.items()}


def discriminative_scales(fisher: dict, min_scale: float = 0.1, normalize: str = "max") -> dict:
    """``{name: clip(mean(F_name) / norm, min_scale, 1)}``, norm = max (or mean) of the tensor means."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    if normalize not in ("max", "mean"):
        raise ValueError(f"normalize must be 'max' or 'mean', got {normalize!r}")
    importance = {n: float(np.mean(f)) for n, f in fisher.items()}
    values = np.array(list(importance.values()))
    norm = values.max() if normalize == "max" else values.mean()
    if not norm > 0:
        return {n: 1.0 for n in importance}
    return {n: float(np.clip(v / norm, min_scale, 1.0)) for n, v in importance.items()}

