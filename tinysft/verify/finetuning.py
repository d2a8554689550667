"""Fine-tuning strategies: layer-wise LR decay, discriminative (Fisher) scaling, distillation."""
import re
from types import SimpleNamespace

import numpy as np

from . import reference as ref
from .optimizers import rounding_allowance
from .registry import Measure, check

DECAY, LR = 0.8, 0.1
MIN_SCALE = 0.01
_BLOCK = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)embed")


def _prepare():
    from ..finetune.strategies import prepare
    return prepare


def _tiny_model(rng, dtype, m):
    """A 3-block BERT from tinysft.models (no dropout); without it, a stand-in with the same name layout."""
    gen = np.random.default_rng(rng.integers(2**63))
    try:
        from ..models import BertConfig, BertForSequenceClassification
    except ImportError as error:
        m.note(f"fallback: tinysft.models not importable ({error}); used a stand-in "
               "embeddings / layer.i / classifier MLP")
        return _stand_in(gen, dtype)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=12, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config, num_labels=3, generator=gen).astype(dtype).eval()
    ids = gen.integers(1, 30, (4, 6))
    mask = np.ones((4, 6), dtype=np.int64)
    mask[1, 4:] = 0
    m.note("tiny BERT from tinysft.models: 3 blocks, hidden 8, "
           f"{sum(p.size for p in model.parameters())} weights in {len(list(model.parameters()))} tensors")
    return model, (lambda: model(ids, mask)), 3


def _stand_in(gen, dtype):
    from .. import nn

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Linear(5, 6, generator=gen, dtype=dtype)
            self.layer = nn.ModuleList([nn.Linear(6, 6, generator=gen, dtype=dtype) for _ in range(3)])
            self.classifier = nn.Linear(6, 3, generator=gen, dtype=dtype)

        def forward(self, x):
            h = self.embeddings(x)
            for block in self.layer:
                h = block(h).tanh()
            return self.classifier(h)

    model = StandIn()
    x = gen.standard_normal((4, 5)).astype(dtype)
    from ..tensor import Tensor
    return model, (lambda: model(Tensor(x))), 3


def depth_of(name, num_blocks):
    """Depth from the top, read from a parameter's name: head 0, block i → L − i, embeddings L + 1."""
    block = _BLOCK.search(name)
    if block:
        return num_blocks - int(block.group(1))
    if _EMBED.search(name):
        return num_blocks + 1
    return 0


@check("layerwise_lr_decay", "finetuning",
       formula="θ_l ← θ_l − η_l ∇_{θ_l} L,  η_l = η · decay^depth(l);  depth: head 0, top block 1, …, embeddings L+1",
       method="tiny 3-block BERT (tinysft.models) through finetune.prepare('layerwise', decay=0.8): every "
              "tensor's group lr vs η·decay^depth read from its name; one SGD step Δθ vs −η_l·∇L",
       explanation="""
       Layer-wise LR decay (Howard & Ruder 2018; Clark et al. 2020) gives lower layers, which hold
       general features, smaller steps: the group at depth d (counted from the top) uses η·decay^d.
       With L blocks: head η, block L−1 η·decay, ..., block 0 η·decay^L, embeddings η·decay^(L+1).
       The check reads each parameter's depth from its name itself (bert.embeddings.*, bert.encoder.
       layer.i.*, rest = head), compares every tensor's group lr with η·decay^depth, then takes one
       SGD step on a real loss and checks Δθ = −η_l·∇_{θ_l}L tensor by tensor. An off-by-one
       exponent (decay^(d+1)) changes every rate by a factor decay and fails.
       """,
       impl=_prepare)
def check_layerwise(rng, dtype, impl):
    from .. import functional as F
    from ..optim import SGD
    m = Measure(dtype)
    model, forward, blocks = _tiny_model(rng, dtype, m)
    named = list(model.named_parameters())
    plan = impl(model, "layerwise", lr=LR, decay=DECAY)
    lr_of = {}
    for group in plan.param_groups:
        for p in group["params"]:
            m.require("no tensor in two groups", id(p) not in lr_of, "a parameter sits in two groups")
            lr_of[id(p)] = group["lr"]
    missing = [n for n, p in named if id(p) not in lr_of]
    m.require("every tensor in a group", not missing, f"not in any group: {missing[:3]}")
    depths = {n: depth_of(n, blocks) for n, _ in named}
    m.require("depths span 0 … L+1", set(depths.values()) == set(range(blocks + 2)),
              f"depths read from names: {sorted(set(depths.values()))}")
    got = np.array([lr_of.get(id(p), np.nan) for _, p in named])
    want = np.array([LR * DECAY ** depths[n] for n, _ in named])
    m.close("group lr of every tensor vs η·decay^depth", got, want, 1e-12)

    labels = rng.integers(0, 3, 4)
    before = [p.numpy().astype(np.float64) for _, p in named]
    loss = F.cross_entropy(forward(), labels)
    loss.backward()
    grads = [np.asarray(p.grad, dtype=np.float64) for _, p in named]
    SGD(plan.param_groups, lr=LR).step()
    delta = np.concatenate([(p.numpy().astype(np.float64) - b).ravel() for (_, p), b in zip(named, before)])
    expect = np.concatenate([(-LR * DECAY ** depths[n] * g).ravel() for (n, _), g in zip(named, grads)])
    theta = np.concatenate([b.ravel() for b in before])
    m.close("one SGD step: Δθ vs −η·decay^depth·∇L, every tensor", delta, expect,
            m.tol + rounding_allowance(m.dtype, theta, expect, 1))
    m.require("the step moved every tensor with a gradient",
              all(np.any(g != 0) for g in grads), "some tensor got an all-zero gradient: the step test is weaker")
    return m


def _fisher_impls():
    from ..finetune.strategies import fisher_diagonal, prepare
    return SimpleNamespace(prepare=prepare, fisher_diagonal=fisher_diagonal)


def _mlp(gen, dtype):
    from .. import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5, 6, generator=gen, dtype=dtype)
            self.fc2 = nn.Linear(6, 3, generator=gen, dtype=dtype)

        def forward(self, x):
            return self.fc2(self.fc1(x).tanh())

    return MLP()


def fisher_by_hand(w1, b1, w2, b2, batches):
    """Diagonal empirical Fisher of logits = tanh(X W1ᵀ + b1) W2ᵀ + b2, backpropagated by hand in float64."""
    total = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    for x, y in batches:
        h = np.tanh(x @ w1.T + b1)
        logits = h @ w2.T + b2
        d_logits = (ref.softmax(logits) - ref.one_hot(y, w2.shape[0])) / len(y)  # mean loss of the batch
        d_h = d_logits @ w2
        d_z = d_h * (1 - h * h)
        grads = (d_z.T @ x, d_z.sum(0), d_logits.T @ h, d_logits.sum(0))
        for t, g in zip(total, grads):
            t += g * g
    return [t / len(batches) for t in total]


@check("fisher_scaling", "finetuning",
       formula="F_j = (1/B) Σ_b (∂L_b/∂θ_j)²;  I_t = mean_{j∈t} F_j;  lr_t = η·clip(I_t / max_t' I_t', s_min, 1)",
       method="2-layer tanh MLP, 4 batches of 6, s_min = 0.01: F by hand-written backprop in float64 vs "
              "finetune.fisher_diagonal; per-tensor lr of prepare('discriminative') vs the formula",
       explanation="""
       The diagonal of the empirical Fisher information, F_j = E_b[(∂L_b/∂θ_j)²], measures how
       sensitive the task loss is to weight j (it is the diagonal of the Gauss-Newton curvature for
       log-likelihood losses, as in EWC). Discriminative fine-tuning gives each tensor t a rate
       proportional to its mean Fisher I_t, normalised by the largest (so the most sensitive tensor
       gets η) and clipped below at s_min (min_scale) (so nothing freezes). The check backpropagates the
       batch-mean cross-entropy by hand — dlogits = (P − Y)/n, dW2 = dlogitsᵀh, dh = dlogits·W2,
       dz = dh(1 − h²), dW1 = dzᵀX — squares, averages over batches, and recomputes every rate.
       Squaring the mean gradient instead (mean_b g)² would be a different quantity and fails.
       """,
       impl=_fisher_impls)
def check_fisher(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    model = _mlp(np.random.default_rng(rng.integers(2**63)), dtype)
    batches = [(np.asarray(rng.standard_normal((6, 5)), dtype=dtype).astype(np.float64), rng.integers(0, 3, 6))
               for _ in range(4)]
    loader = [(Tensor(np.array(x, dtype=dtype)), y) for x, y in batches]
    weights = [p.numpy().astype(np.float64) for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight,
                                                      model.fc2.bias)]
    want = fisher_by_hand(*weights, batches)
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    got = impl.fisher_diagonal(model, loader)
    m.close("diagonal Fisher F vs hand backprop, every weight", np.concatenate([got[n].ravel() for n in names]),
            np.concatenate([f.ravel() for f in want]))
    importance = np.array([f.mean() for f in want])
    scales = np.clip(importance / importance.max(), MIN_SCALE, 1.0)
    m.require("at least 3 of 4 scales strictly inside (s_min, 1] (the check is not all clipping)",
              np.sum(scales > MIN_SCALE) >= 3, f"scales {scales}")
    plan = impl.prepare(model, "discriminative", lr=LR, fisher_loader=loader, min_scale=MIN_SCALE)
    lr_of = {id(p): g["lr"] for g in plan.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    m.close("per-tensor lr vs η·clip(I_t/max I, s_min, 1)", np.array([lr_of.get(id(params[n]), np.nan) for n in names]),
            LR * scales)
    m.note("scales " + ", ".join(f"{n} {s:.3g}" for n, s in zip(names, scales)))
    return m


def _kd_loss():
    from ..finetune.distill import kd_loss
    return kd_loss


@check("distillation", "finetuning",
       formula="L = α·T²·(1/N)Σ_i KL(p_t,i ‖ p_s,i) + (1−α)·CE(z_s, y), p = softmax(z/T);  "
               "∂(T²·KL-term)/∂z_s = T·(p_s − p_t)/N",
       method="T = 3, α = 0.7, 8 rows (1 ignored): loss and ∂L/∂z_s vs the formula; KL part alone (α = 1) vs "
              "T(p_s − p_t)/N; central differences; teacher gets no gradient; T = 1000 limit",
       explanation="""
       Per row, KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c) with log p_s = z_s/T − lse(z_s/T).
       Only −Σ_c p_t,c log p_s,c depends on z_s, and ∂/∂z_s of it is (p_s − p_t)·(1/T) (softmax-CE
       gradient, times the chain-rule 1/T). Averaged over N rows and multiplied by T²:
           ∂(T²·KL-term)/∂z_s = T²·(p_s − p_t)/(T·N) = T·(p_s − p_t)/N.
       Why T²: for large T, p ≈ (1 + (z − z̄)/T)/C, so p_s − p_t ≈ ((z_s − z̄_s) − (z_t − z̄_t))/(C·T)
       and T·(p_s − p_t) → ((z_s − z̄_s) − (z_t − z̄_t))/C: without T² the soft gradient would shrink
       like 1/T²; with it, it tends to logit matching, independent of T (Hinton et al. 2015). The check
       tests that limit at T = 1000 with zero-mean logits (error O(|z|/T)). The hard term adds
       (1−α)(softmax(z_s) − y)/N; the teacher is a constant.
       """,
       impl=_kd_loss)
def check_distillation(rng, dtype, impl):
    from ..tensor import Tensor
    m = Measure(dtype)
    n, c, temp, alpha = 8, 5, 3.0, 0.7
    zs = np.asarray(2 * rng.standard_normal((n, c)), dtype=dtype).astype(np.float64)
    zt = np.asarray(2 * rng.standard_normal((n, c)), dtype=dtype).astype(np.float64)
    y = rng.integers(0, c, n)
    y[5] = -100
    kept = y != -100
    k = kept.sum()
    lps, lpt = ref.log_softmax(zs / temp), ref.log_softmax(zt / temp)
    ps, pt = np.exp(lps), np.exp(lpt)
    kl_rows = (pt * (lpt - lps)).sum(1)
    ce_rows = -ref.log_softmax(zs)[np.arange(n), np.where(kept, y, 0)]
    want = alpha * temp ** 2 * kl_rows[kept].mean() + (1 - alpha) * ce_rows[kept].mean()
    want_grad = (alpha * temp * (ps - pt) + (1 - alpha) * (ref.softmax(zs) - ref.one_hot(np.where(kept, y, 0), c))) / k
    want_grad[~kept] = 0.0

    student = Tensor(np.array(zs, dtype=dtype), requires_grad=True)
    teacher = Tensor(np.array(zt, dtype=dtype), requires_grad=True)
    loss = impl(student, teacher, y, temperature=temp, alpha=alpha)
    loss.backward()
    m.close("L vs α·T²·KL + (1−α)·CE, mean over labelled rows", loss, want)
    m.close("∂L/∂z_s vs α·T(p_s − p_t)/N + (1−α)(softmax(z_s) − y)/N", student.grad, want_grad)
    m.require("the teacher gets no gradient", teacher.grad is None or not np.any(teacher.grad),
              "a gradient reached the teacher's logits")

    soft = Tensor(np.array(zs, dtype=dtype), requires_grad=True)
    impl(soft, zt, None, temperature=temp, alpha=1.0).backward()
    m.close("KL part alone (α = 1): ∂(T²·KL)/∂z_s vs T·(p_s − p_t)/N", soft.grad, temp * (ps - pt) / n)

    big_t = 1000.0
    zs0, zt0 = zs - zs.mean(1, keepdims=True), zt - zt.mean(1, keepdims=True)
    limit = Tensor(np.array(zs0, dtype=dtype), requires_grad=True)
    impl(limit, zt0, None, temperature=big_t, alpha=1.0).backward()
    m.close("T = 1000: ∂(T²·KL)/∂z_s vs (z_s − z_t)/(C·N), zero-mean logits", limit.grad,
            (zs0 - zt0) / (c * n), 1e-2)

    small_s, small_t, small_y = zs[:3, :4], zt[:3, :4], np.array([1, -100, 3])
    ref.autograd_vs_fd(m, lambda s: impl(s, small_t, small_y, temperature=temp, alpha=alpha), [small_s], rng,
                       names=["z_s"])
    return m
