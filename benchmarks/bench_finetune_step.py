"""A full fine-tuning step on a MiniLM-L6-shaped BERT, against PyTorch CPU in the same run.

    python3 benchmarks/bench_finetune_step.py            # BENCH_THREADS=1 to pin one thread
    python3 benchmarks/bench_finetune_step.py --profile 3   # also cProfile 3 tinysft steps at 16x64

The model: 6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522, exact GELU, post-LN,
dropout 0.1 (all-MiniLM-L6-v2's shape), random init; mean pooling over the attention mask and a
26-label linear head (``tinysft.models.BertForSequenceClassification``). PyTorch runs a compact
BERT written below with the same names and shapes, loaded with tinysft's initial weights (the two
are first checked to give the same logits in eval mode).

One step = forward, cross-entropy (mean), backward, AdamW step (lr 2e-5, weight decay 0.01; the
defaults of both libraries otherwise). PyTorch's AdamW is timed twice on the same model: its
default (a per-tensor loop on the CPU) and ``fused=True``. Batches are B×T random token ids with
random lengths in [T/2, T] (the rest padding). Also a forward-only timing (eval mode, no_grad).
Per-phase medians (forward + loss, backward, optimizer) come from the same timed steps, with
the minor page faults of a step and the kernel time they cost (``getrusage``): every fresh
array that the allocator maps anew is zeroed page by page by the kernel.
"""
import argparse
import math
import os
import resource
import statistics
import time

import _timing  # first: pins BLAS threads before NumPy loads
import numpy as np

import tinysft
from tinysft import functional as F
from tinysft.models import BertConfig, BertForSequenceClassification
from tinysft.optim import AdamW

torch = _timing.load_torch()
CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, hidden_act="gelu")
NUM_LABELS, LR = 26, 2e-5
STEP_SHAPES = [(16, 64), (32, 40)]
FORWARD_SHAPE = (32, 64)


def batch(b, t, vocab, seed=0):
    """Token ids (B, T) with random lengths in [T/2, T], the attention mask, and labels (B,)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, (b, t)) * mask  # padding id 0
    return ids, mask, rng.integers(0, NUM_LABELS, b)


if torch:
    nn = torch.nn

    def _box(**children):
        """A bare Module holding ``children`` (only so parameter names read as Hugging Face's)."""
        module = nn.Module()
        for name, child in children.items():
            module.add_module(name, child)
        return module

    class TorchBert(nn.Module):
        """Post-LN BERT + mean pooling + dropout + linear head, with tinysft's (HF's) parameter names."""

        def __init__(self, c: BertConfig, num_labels: int):
            super().__init__()
            d, i, eps = c.hidden_size, c.intermediate_size, c.layer_norm_eps
            self.heads, self.head_dim = c.num_attention_heads, d // c.num_attention_heads

            def layer():
                return _box(attention=_box(self=_box(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d)),
                                           output=_box(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps))),
                            intermediate=_box(dense=nn.Linear(d, i)),
                            output=_box(dense=nn.Linear(i, d), LayerNorm=nn.LayerNorm(d, eps)))

            self.bert = _box(
                embeddings=_box(word_embeddings=nn.Embedding(c.vocab_size, d, padding_idx=c.pad_token_id),
                                position_embeddings=nn.Embedding(c.max_position_embeddings, d),
                                token_type_embeddings=nn.Embedding(c.type_vocab_size, d),
                                LayerNorm=nn.LayerNorm(d, eps)),
                encoder=_box(layer=nn.ModuleList(layer() for _ in range(c.num_hidden_layers))))
            self.head = _box(classifier=nn.Linear(d, num_labels))
            self.dropout = nn.Dropout(c.hidden_dropout_prob)
            self.attention_dropout = nn.Dropout(c.attention_probs_dropout_prob)

        def forward(self, ids, mask):
            # ids, mask: (B, T) -> logits (B, num_labels)
            b, t = ids.shape
            e = self.bert.embeddings
            x = e.word_embeddings(ids) + e.position_embeddings.weight[:t] + e.token_type_embeddings.weight[0]
            x = self.dropout(e.LayerNorm(x))  # (B, T, D)
            bias = (1.0 - mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min  # (B, 1, 1, T)

            def split(y):  # (B, T, D) -> (B, H, T, d)
                return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

            for layer in self.bert.encoder.layer:
                attn = getattr(layer.attention, "self")
                q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
                scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + bias  # (B, H, T, T)
                probs = self.attention_dropout(torch.softmax(scores, dim=-1))
                context = (probs @ v).transpose(1, 2).reshape(b, t, -1)  # (B, T, D)
                out = layer.attention.output
                h = out.LayerNorm(x + self.dropout(out.dense(context)))
                ffn = layer.output.dense(nn.functional.gelu(layer.intermediate.dense(h)))  # exact (erf) GELU
                x = layer.output.LayerNorm(h + self.dropout(ffn))
            m = mask.to(x.dtype)
            weights = m / m.sum(dim=1, keepdim=True).clamp(min=1e-9)  # (B, T)
            pooled = (x * weights[:, :, None]).sum(dim=1)  # (B, D)
            return self.head.classifier(self.dropout(pooled))


def build():
    """tinysft's model and optimizer, and PyTorch's copy with a default and a fused AdamW."""
    tinysft.rng.manual_seed(0)
    config = BertConfig(**CONFIG)
    model = BertForSequenceClassification(config, num_labels=NUM_LABELS, pooling="mean").train()
    optimizer = AdamW(model.parameters(), lr=LR)
    if not torch:
        return config, model, optimizer, None, None, None
    torch.manual_seed(0)
    tmodel = TorchBert(config, NUM_LABELS)
    tmodel.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    tdefault = torch.optim.AdamW(tmodel.parameters(), lr=LR)
    tfused = torch.optim.AdamW(tmodel.parameters(), lr=LR, fused=True)
    return config, model, optimizer, tmodel.train(), tdefault, tfused


def check_same_logits(config, model, tmodel):
    """Eval mode, one batch: the two models must agree before either is timed."""
    ids, mask, _ = batch(4, 32, config.vocab_size, seed=1)
    model.eval(), tmodel.eval()
    with tinysft.no_grad(), torch.no_grad():
        ours = model(ids, mask).numpy()
        theirs = tmodel(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    model.train(), tmodel.train()
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert error < 1e-4, f"tinysft and torch logits differ: relative max error {error:.2e}"
    print(f"# eval-mode logits agree: max |tinysft - torch| / max |torch| = {error:.1e}")


def _faults():
    """(minor page faults, kernel seconds) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def tinysft_step(model, optimizer, ids, mask, labels, phases):
    faults, started = _faults(), time.perf_counter()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(ids, mask), labels)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    phases.append((forward - started, backward - forward, time.perf_counter() - backward,
                   *(after - before for after, before in zip(_faults(), faults))))


def torch_step(model, optimizer, ids, mask, labels, phases):
    faults, started = _faults(), time.perf_counter()
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    phases.append((forward - started, backward - forward, time.perf_counter() - backward,
                   *(after - before for after, before in zip(_faults(), faults))))


def phase_text(phases):
    fwd, bwd, opt = (statistics.median(p[i] for p in phases) * 1e3 for i in range(3))
    faults, kernel = (statistics.median(p[i] for p in phases) for i in (3, 4))
    return (f"fwd+loss {fwd:.0f} / bwd {bwd:.0f} / opt {opt:.0f} ms; "
            f"{faults:,.0f} page faults, {kernel * 1e3:.0f} ms kernel time")


def bench_step(config, model, optimizer, tmodel, tdefault, tfused, b, t, repeats):
    ids, mask, labels = batch(b, t, config.vocab_size)
    phases = {"tinysft": [], "torch": [], "torch fused": []}
    fns = {"tinysft": lambda: tinysft_step(model, optimizer, ids, mask, labels, phases["tinysft"])}
    if torch:
        tids, tmask, tlabels = (torch.from_numpy(a) for a in (ids, mask, labels))
        fns["torch"] = lambda: torch_step(tmodel, tdefault, tids, tmask, tlabels, phases["torch"])
        fns["torch fused"] = lambda: torch_step(tmodel, tfused, tids, tmask, tlabels, phases["torch fused"])
    times = _timing.compare_many(fns, repeats=repeats, warmup=1)
    ours = times["tinysft"]
    name = f"step {b}x{t} (AdamW)"
    _timing.row(f"{name}, torch default", ours, times.get("torch"), unit="s", scale=1,
                extra=f"tinysft {b / ours:.1f} examples/s")
    if torch:
        _timing.row(f"{name}, torch fused=True", ours, times["torch fused"], unit="s", scale=1)
    for lib, recorded in phases.items():
        if recorded:
            print(f"{'':<40} {lib}: {phase_text(recorded)}")


def bench_forward(config, model, tmodel, b, t, repeats):
    ids, mask, _ = batch(b, t, config.vocab_size)

    def ours():
        with tinysft.no_grad():
            model(ids, mask)

    theirs = None
    if torch:
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)

        def theirs():
            with torch.no_grad():
                tmodel(tids, tmask)

    model.eval()
    if torch:
        tmodel.eval()
    ours_s, theirs_s = _timing.compare(ours, theirs, repeats=repeats, warmup=1)
    model.train()
    if torch:
        tmodel.train()
    _timing.row(f"forward {b}x{t} (eval, no_grad)", ours_s, theirs_s, unit="s", scale=1,
                extra=f"tinysft {b / ours_s:.1f} examples/s")


def profile(config, model, optimizer, steps, b=16, t=64, top=25):
    ids, mask, labels = batch(b, t, config.vocab_size)
    tinysft_step(model, optimizer, ids, mask, labels, [])  # warm
    _timing.profile(lambda: tinysft_step(model, optimizer, ids, mask, labels, []), steps,
                    f"tinysft steps at {b}x{t}", top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per library per shape (default 6)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="afterwards, cProfile this many tinysft steps at 16x64")
    args = parser.parse_args()
    _timing.header("bench_finetune_step: MiniLM-L6-shaped BERT, tinysft vs PyTorch CPU "
                   "(ratio = tinysft time / torch time)", torch)
    config, model, optimizer, tmodel, tdefault, tfused = build()
    print(f"# {sum(p.size for p in model.parameters()):,} parameters; AdamW lr {LR}, weight decay 0.01")
    if torch:
        check_same_logits(config, model, tmodel)
    for b, t in STEP_SHAPES:
        bench_step(config, model, optimizer, tmodel, tdefault, tfused, b, t, args.repeats)
    bench_forward(config, model, tmodel, *FORWARD_SHAPE, repeats=args.repeats)
    if hasattr(os, "getloadavg"):
        print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    if args.profile:
        profile(config, model, optimizer, args.profile)
