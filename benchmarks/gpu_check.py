"""The checks of benchmarks/gpu_check.sh, one line each on stdout (run that script, which sets PYTHONPATH and
brings the wheels; this file assumes both).

  (a) a CUDA training step of `compress.train.fit` under AMP with channels_last, seen from inside the model;
  (b) the quickstart recipe through train, reparam, prune and finetune with device=cuda (`python compress.py`),
      and the re-parameterization check it records under the process's default TF32 settings;
  (c) PyTorch eager latency of the plain and pruned models of (b) on CUDA (`compress.bench.benchmark`).

A check whose packages are missing is skipped, with a line that names the package; a failed check prints FAIL
and makes the exit status 1. Extra arguments are passed on to compress.py in (b), e.g. `--set train.epochs=1`.

Environment: GPU_CHECK_DEVICE (cuda, the default, or cpu to rehearse every check on a CPU), GPU_CHECK_OUT (the
work folder, kept; default a temporary one), GPU_CHECK_HIDE (comma-separated modules made unimportable, here and
in compress.py, to rehearse a machine without them: e.g. nncf,onnxruntime).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HIDDEN = [name for name in os.environ.get("GPU_CHECK_HIDE", "").split(",") if name]
sys.modules.update(dict.fromkeys(HIDDEN))  # None in sys.modules: `import name` fails as if it were not installed

# compress.py run with the same modules hidden (the child inherits GPU_CHECK_HIDE); argv: compress.py ARGS...
RUN_COMPRESS = (
    "import os, runpy, sys; "
    "sys.modules.update(dict.fromkeys(n for n in os.environ.get('GPU_CHECK_HIDE', '').split(',') if n)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
STAGES_WITHOUT_PRUNING = ["train", "reparam"]
PRUNING_STAGES = ["prune", "finetune"]
PROJECT_PACKAGES = {"compress", "repvgg"}
CLI_TIMEOUT_S = 240  # the whole script must end within 5 minutes on the GPU machine


class Skip(Exception):
    """A check that cannot run here: the reason is printed instead of a result."""


class Fail(Exception):
    """A check that ran and found something wrong."""


def missing(*modules: str) -> str | None:
    """Which package `modules` need (their own imports included) and is not installed here, said in words; None if
    they all import. A module of this project that is missing, or any other import error, is a Fail."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in PROJECT_PACKAGES:
                raise Fail(f"the checkout is broken: {e}") from None  # not a missing install: never a skip
            return f"needs {e.name or module}, which is not installed"
        except ImportError as e:  # installed but unusable (a version without some name): a finding, not a skip
            raise Fail(f"importing {module} failed: {e}") from None
    return None


def need(*modules: str) -> None:
    reason = missing(*modules)
    if reason is not None:
        raise Skip(reason)


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "no output"


def check_train_step(device: str, work: Path) -> str:
    """One epoch of `fit` on 256 digits images; a forward hook on the first conv records, per training step, the
    dtype autocast gave its output and whether its input was channels_last. fit promises both on CUDA, neither on
    CPU."""
    need("compress.train", "compress.env", "compress.data", "compress.recipe", "repvgg")
    import torch

    from compress.data import build_data
    from compress.env import Env
    from compress.recipe import DataCfg, OptimCfg
    from compress.train import TrainingError, fit
    from repvgg import RepVGG

    data = build_data(DataCfg(kind="digits", image_size=32, batch_size=64, augment="none", train_subset=256), seed=0)
    torch.manual_seed(0)
    model = RepVGG([1, 1, 1, 1], [0.25, 0.25, 0.25, 0.25], num_classes=data.num_classes, stem_stride=1)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []

    def record(module, inputs, output):
        if module.training:  # training steps only, not fit's evaluation pass
            seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    first_conv.register_forward_hook(record)
    cfg = OptimCfg(epochs=1, lr=0.05, amp=True, channels_last=True)
    log = work / "train_step.log"
    start = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        try:
            result = fit(model, cfg, data, Env(device=torch.device(device), out_dir=work), tag="gpu_check",
                         ckpt_path=work / "train_step.ckpt", key="gpu_check")
        except TrainingError as e:
            raise Fail(str(e)) from None
    seconds = time.perf_counter() - start
    cuda = device == "cuda"
    expected = (torch.float16 if cuda else torch.float32, cuda)
    steps = data.steps_per_epoch()
    if len(seen) != steps or set(seen) != {expected}:
        raise Fail(f"expected {steps} steps of (conv output dtype, channels_last input) = {expected}, saw {set(seen)}"
                   f" over {len(seen)}")
    what = "AMP float16 conv outputs, channels_last input" if cuda else "float32 conv outputs, contiguous input"
    return f"ok: {steps} steps, {what}; train_loss {result['history'][-1]['train_loss']:.3f}, {seconds:.1f} s"


def check_quickstart(device: str, run_dir: Path, extra_args: list[str]) -> str:
    """compress.py on the quickstart recipe; the stages that need Torch-Pruning only where it imports."""
    need("compress.cli", "compress.pipeline", "compress.stages")
    no_pruning = missing("torch_pruning", "compress.prune")
    stages = STAGES_WITHOUT_PRUNING + ([] if no_pruning else PRUNING_STAGES)
    cmd = [sys.executable, "-c", RUN_COMPRESS, "compress.py", "--recipe", "recipes/quickstart.yaml",
           "--stages", ",".join(stages), "--set", f"device={device}", "--out", str(run_dir), *extra_args]
    log = run_dir.parent / "compress.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=CLI_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            raise Fail(f"compress.py ran past {CLI_TIMEOUT_S} s; last lines: {tail(log)}") from None
    seconds = time.perf_counter() - start
    if rc != 0:
        raise Fail(f"compress.py exited {rc}: {tail(log)}")
    done = json.loads((run_dir / "summary.json").read_text())["stages"]
    reparam = done["reparam"]
    diff, scale = reparam["max_abs_diff"], reparam["max_abs_logit"]
    tops = ", ".join(f"{s} top1 {done[s]['top1']:.1f}" for s in stages if "top1" in done.get(s, {}))
    skipped = f" ({', '.join(PRUNING_STAGES)} skipped: {no_pruning})" if no_pruning else ""
    return (f"ok: {','.join(stages)} in {seconds:.0f} s{skipped}; reparam max_abs_diff {diff:.3g}, max_abs_logit "
            f"{scale:.3g} (relative {diff / max(scale, 1.0):.2g}); {tops}")


def check_latency(device: str, run_dir: Path) -> str:
    """Eager latency of the run's plain.pt and finetuned.pt (those that exist) on `device`."""
    need("compress.bench", "compress.files", "onnxruntime")
    from compress.bench import BenchOptions, benchmark
    from compress.files import load_model

    files = {"plain": run_dir / "plain.pt", "pruned": run_dir / "finetuned.pt"}
    models = {name: load_model(path) for name, path in files.items() if path.exists()}
    if not models:
        raise Skip("no plain.pt or finetuned.pt: check (b) made none")
    options = BenchOptions(batch_sizes=(1, 64), warmup=10, iters=30, rounds=3, runtimes=("torch",))
    result = benchmark({}, options, 32, torch_models=models, reference="plain", torch_device=device)
    (run_dir / "torch_latency.json").write_text(json.dumps(result, indent=1))
    rows = [r for r in result["results"] if r["provider"] == "torch"]
    if not rows:
        raise Fail(f"nothing timed: {result['machine']['skipped_providers']}")
    latency = "; ".join(f"{r['artifact']} {r['median_ms']:.3f} ms @{r['batch']}" for r in rows)
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items())
    absent = "" if "pruned" in models else " (no finetuned.pt: pruned model not timed)"
    return f"ok: {latency}; {ratios or 'no ratio'} at batch 1 [{rows[0]['timing']}]{absent}"


def report(label: str, check: Callable[[], str], cuda_missing: bool) -> bool:
    """Print one line for `check`; False if it failed."""
    if cuda_missing:
        print(f"{label}: skipped: no CUDA device here (GPU_CHECK_DEVICE=cpu rehearses on the CPU)", flush=True)
        return True
    try:
        print(f"{label}: {check()}", flush=True)
        return True
    except Skip as e:
        print(f"{label}: skipped: {e}", flush=True)
        return True
    except Fail as e:
        print(f"{label}: FAIL: {e}", flush=True)
        return False


def main(extra_args: list[str]) -> int:
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if device not in ("cuda", "cpu"):
        print(f"GPU_CHECK_DEVICE must be cuda or cpu, got {device!r}")
        return 2
    import torch

    cuda_missing = device == "cuda" and not torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"gpu_check: device {device} ({gpu}); python {platform.python_version()}, torch {torch.__version__}; "
          f"TF32 as the process starts: cudnn {torch.backends.cudnn.allow_tf32}, matmul precision "
          f"{torch.get_float32_matmul_precision()}; hidden modules: {','.join(HIDDEN) or 'none'}", flush=True)
    out = os.environ.get("GPU_CHECK_OUT")
    with contextlib.ExitStack() as stack:
        work = Path(out) if out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        work.mkdir(parents=True, exist_ok=True)
        run_dir = work / "quickstart"
        ok = [
            report("(a) train step, AMP + channels_last", lambda: check_train_step(device, work), cuda_missing),
            report("(b) quickstart train..finetune", lambda: check_quickstart(device, run_dir, extra_args),
                   cuda_missing),
            report("(c) torch eager latency, plain vs pruned", lambda: check_latency(device, run_dir), cuda_missing),
        ]
    print(f"gpu_check: {'all checks passed or skipped' if all(ok) else 'FAILED'}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
