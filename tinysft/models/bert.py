"""A BERT-family encoder built from ``tinysft.nn``, with Hugging Face's parameter names.

Names match ``transformers.BertModel`` exactly, so its ``model.safetensors`` loads
by name: ``embeddings.word_embeddings.weight``, ``encoder.layer.{i}.attention.self.query.weight``,
``encoder.layer.{i}.attention.output.LayerNorm.bias``, ``encoder.layer.{i}.intermediate.dense.weight``,
``encoder.layer.{i}.output.dense.weight``, ``pooler.dense.weight``, ...

    >>> model = BertModel.from_pretrained()              # all-MiniLM-L6-v2, offline (see locate.py)
    >>> tok = WordPieceTokenizer.from_dir(model.name_or_path)
    >>> model.encode(["a cat", "a dog"], tok).shape      # mean-pooled, L2-normalised
    (2, 384)
    >>> clf = BertForSequenceClassification(model, num_labels=26, pooling="mean")
    >>> groups = layer_groups(clf)                       # embeddings, layer 0..5, head: for LR decay
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .. import functional as F
from .. import nn
from ..nn.module import StateDictError
from ..tensor import Tensor, no_grad
from .locate import locate_model

# checkpoint entries that are buffers, not parameters (HF registers them with persistent=True in old versions)
SKIPPED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclass
class BertConfig:
    """The fields of a HF BERT ``config.json`` that the architecture needs (others are ignored)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # "gelu" exact erf, "gelu_new"/"gelu_pytorch_tanh" the tanh form, "relu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                             "(only 'absolute')")
        nn.activation(self.hidden_act)  # unknown activations fail here, not mid-forward

    @classmethod
    def from_dict(cls, values: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return {"model_type": "bert", "architectures": ["BertModel"], **asdict(self)}


def _as_ids(ids):
    """Token ids as an integer array (from a Tensor, array or nested list)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    return ids


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings → LayerNorm → dropout."""

    def __init__(self, config: BertConfig, generator=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id, generator=generator)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                generator=generator)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, generator=generator)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None) -> Tensor:
        # input_ids: (B, T) -> (B, T, D)
        ids = _as_ids(input_ids)
        t = ids.shape[1]
        if t > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(ids)  # (B, T, D)
        x = x + self.position_embeddings.weight[:t]  # + (T, D)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # + (D,): every token is segment 0
        else:
            x = x + self.token_type_embeddings(_as_ids(token_type_ids))  # + (B, T, D)
        return self.dropout(self.LayerNorm(x))  # (B, T, D)


class BertModel(nn.Module):
    """BERT encoder: ``embeddings`` → ``encoder`` (``encoder.layer[i]``) → [``pooler``].

    ``forward`` returns the last hidden state (B, T, D); ``pooler`` (dense+tanh on
    [CLS]) is only used by ``pooled_output``.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, generator=None):
        super().__init__()
        self.config = config
        self.name_or_path = None
        self.embeddings = BertEmbeddings(config, generator)
        self.encoder = nn.TransformerEncoder(
            config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.hidden_act, config.hidden_dropout_prob, config.attention_probs_dropout_prob,
            config.layer_norm_eps, norm_first=False, generator=generator)
        self.pooler = nn.Pooler(config.hidden_size, generator) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None,
                output_hidden_states: bool = False):
        # input_ids, attention_mask, token_type_ids: (B, T) -> last_hidden_state (B, T, D)
        # (with output_hidden_states: (last, [embeddings, layer 0, ..., layer N-1]))
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        mask = None if attention_mask is None else _as_ids(attention_mask)
        return self.encoder(x, mask, output_hidden_states)

    def pooled_output(self, last_hidden_state: Tensor) -> Tensor:
        """BERT's pooler on [CLS]: (B, T, D) -> (B, D)."""
        if self.pooler is None:
            raise ValueError("this BertModel was built without a pooler (add_pooling_layer=False)")
        return self.pooler(last_hidden_state)

    # ----- sentence embeddings -----
    def embed(self, input_ids, attention_mask=None, token_type_ids=None, normalize: bool = True) -> Tensor:
        """Mean-pooled (over the mask) and, by default, L2-normalised sentence embeddings (B, D),
        as sentence-transformers' all-MiniLM-L6-v2. Differentiable."""
        hidden = self(input_ids, attention_mask, token_type_ids)  # (B, T, D)
        pooled = F.mean_pool(hidden, attention_mask)  # (B, D)
        return F.l2_normalize(pooled) if normalize else pooled

    def encode(self, texts, tokenizer, batch_size: int = 32, max_length: int = 128,
               normalize: bool = True) -> np.ndarray:
        """Embeddings (N, D) float32 for a list of strings, in inference mode (eval, no graph).

        Texts are batched by length (less padding) and returned in the input order.
        ``tokenizer(texts, max_length=, padding=True, truncation=True)`` must give
        ``input_ids`` and ``attention_mask`` (tinysft's WordPieceTokenizer or HF's).
        """
        if isinstance(texts, str):
            texts = [texts]
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.config.hidden_size), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for start in range(0, len(texts), batch_size):
                    picked = order[start:start + batch_size]
                    batch = tokenizer([texts[i] for i in picked], max_length=max_length, padding=True,
                                      truncation=True)
                    ids = np.asarray(batch["input_ids"], dtype=np.int64)
                    mask = np.asarray(batch["attention_mask"], dtype=np.int64)
                    out[picked] = self.embed(ids, mask, normalize=normalize).numpy()
        finally:
            self.train(was_training)
        return out

    # ----- loading and saving -----
    @classmethod
    def from_pretrained(cls, name_or_path=None, add_pooling_layer=None, strict: bool = True) -> "BertModel":
        """Load config.json and model.safetensors from a folder or an offline hub name
        (``locate_model``); the model comes back in eval mode, as in HF.

        Buffers (``embeddings.position_ids``, ``embeddings.token_type_ids``) are skipped,
        a ``bert.`` prefix is removed, old ``LayerNorm.gamma/beta`` names are renamed;
        every other entry must match a parameter (``strict``), else a StateDictError names
        the missing and unexpected keys. ``add_pooling_layer=None``: a pooler iff the file has one.
        """
        from ..io.safetensors import load_file
        folder = locate_model(name_or_path)
        config = BertConfig.from_json(folder / "config.json")
        weights_path = folder / "model.safetensors"
        if not weights_path.is_file():
            raise FileNotFoundError(f"{folder} has config.json but no model.safetensors "
                                    "(only the safetensors format is read)")
        state = hf_state_dict(load_file(weights_path))
        if add_pooling_layer is None:
            add_pooling_layer = "pooler.dense.weight" in state
        model = cls(config, add_pooling_layer=add_pooling_layer)
        try:
            model.load_state_dict(state, strict=strict)
        except StateDictError as error:
            hint = " (pass strict=False to ignore extra heads)" if error.unexpected else ""
            raise StateDictError(f"{weights_path}: {error}{hint}", error.missing, error.unexpected,
                                 error.mismatched) from None
        model.name_or_path = folder
        return model.eval()

    def save_pretrained(self, folder) -> Path:
        """Write config.json and model.safetensors (HF names) into ``folder``."""
        from ..io.safetensors import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file(dict(self.state_dict()), folder / "model.safetensors")
        return folder


def hf_state_dict(weights: dict) -> dict:
    """HF checkpoint entries → BertModel names: drop buffers, strip ``bert.``, gamma/beta → weight/bias."""
    state = {}
    for name, value in weights.items():
        name = name.removeprefix("bert.")
        if name in SKIPPED_BUFFERS:
            continue
        if name.endswith("LayerNorm.gamma"):
            name = name[:-len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[:-len("beta")] + "bias"
        state[name] = value
    return state


class BertForSequenceClassification(nn.Module):
    """``bert`` (a BertModel) → pooling → ``head`` (dropout → Linear ``head.classifier``) → logits.

    ``pooling``: "mean" (over the attention mask, as sentence-transformers) or "cls".
    ``use_pooler``: with "cls", pass [CLS] through BERT's pretrained pooler (dense+tanh), as
    HF's BertForSequenceClassification. A pooler that the chosen pooling does not use is
    removed from the backbone, so every parameter receives a gradient.

    Modes are not changed here: a backbone from ``BertModel.from_pretrained`` arrives in
    eval mode (as in HF), so call ``.train()`` before fine-tuning (``from_pretrained`` of
    this class does).
    """

    def __init__(self, backbone, num_labels: int, pooling: str = "mean", dropout=None,
                 use_pooler: bool = False, generator=None):
        super().__init__()
        if isinstance(backbone, BertConfig):
            backbone = BertModel(backbone, add_pooling_layer=use_pooler, generator=generator)
        if pooling not in nn.POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(nn.POOLINGS)}, got {pooling!r}")
        if use_pooler and (pooling != "cls" or backbone.pooler is None):
            raise ValueError("use_pooler=True needs pooling='cls' and a backbone with a pooler")
        if not use_pooler:
            backbone.pooler = None
        self.pooling, self.use_pooler, self.num_labels = pooling, use_pooler, num_labels
        self.bert = backbone
        config = backbone.config
        self.head = nn.ClassificationHead(config.hidden_size, num_labels,
                                          config.hidden_dropout_prob if dropout is None else dropout,
                                          generator=generator)

    @classmethod
    def from_pretrained(cls, name_or_path=None, num_labels: int = 2, pooling: str = "mean", dropout=None,
                        use_pooler: bool = False, generator=None):
        """A pretrained backbone with a fresh head, in training mode."""
        backbone = BertModel.from_pretrained(name_or_path)
        return cls(backbone, num_labels, pooling, dropout, use_pooler, generator).train()

    def features(self, input_ids, attention_mask=None, token_type_ids=None) -> Tensor:
        """Pooled features (B, D) fed to the head."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, D)
        if self.use_pooler:
            return self.bert.pooled_output(hidden)  # (B, D)
        return nn.POOLINGS[self.pooling](hidden, attention_mask)  # (B, D)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> Tensor:
        # input_ids, attention_mask, token_type_ids: (B, T) -> logits (B, num_labels)
        return self.head(self.features(input_ids, attention_mask, token_type_ids))


def layer_groups(model, named: bool = False) -> list:
    """Parameters grouped bottom-up for layer-wise LR decay:
    ``[("embeddings", [...]), ("encoder.layer.0", [...]), ..., ("head", [...])]``.

    Names carry the model's prefix (``bert.embeddings`` inside a classifier). The last
    group, "head", holds every remaining parameter (pooler, classifier). With ``named``
    each list holds ``(name, param)`` pairs. Frozen parameters are included; filter on
    ``p.requires_grad`` as needed. Example, decay 0.8 from the top:

        groups = layer_groups(clf)
        param_groups = [{"params": ps, "lr": lr * 0.8 ** (len(groups) - 1 - i)}
                        for i, (_, ps) in enumerate(groups)]
    """
    if isinstance(model, BertModel):
        backbone, prefix = model, ""
    elif isinstance(getattr(model, "bert", None), BertModel):
        backbone, prefix = model.bert, "bert."
    else:
        raise TypeError(f"layer_groups needs a BertModel or a model with a .bert BertModel, got {type(model).__name__}")
    owners = [("embeddings", backbone.embeddings)]
    owners += [(f"encoder.layer.{i}", layer) for i, layer in enumerate(backbone.encoder.layer)]
    groups, taken = [], set()
    for name, module in owners:
        members = list(module.named_parameters(prefix + name))
        taken.update(id(p) for _, p in members)
        groups.append((prefix + name, members))
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in taken]
    if rest:
        groups.append(("head", rest))
    if not named:
        groups = [(name, [p for _, p in members]) for name, members in groups]
    return groups


__all__ = [
    "SKIPPED_BUFFERS",
    "BertConfig",
    "BertEmbeddings",
    "BertForSequenceClassification",
    "BertModel",
    "hf_state_dict",
    "layer_groups",
]
