#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, from a source checkout (no pip install of the project), within
# 5 minutes, one line per check (benchmarks/gpu_check.py says what each one does):
#   (a) a training step of compress.train.fit under AMP with channels_last on CUDA;
#   (b) python compress.py --recipe recipes/quickstart.yaml --stages train,reparam,prune,finetune --set device=cuda,
#       with the re-parameterization check under the default TF32 settings (its max_abs_diff / max_abs_logit);
#   (c) PyTorch eager latency, synchronized, of that run's plain.pt and finetuned.pt on CUDA.
# A check whose packages are missing is skipped with a line that says so; exit status 1 if any check failed.
#
# The borrowed GPU machine has Python 3.12, torch with CUDA, torchvision, onnx, a CPU-only onnxruntime, pyyaml,
# tqdm, scikit-learn, tensorboard, matplotlib, and no network. Bring Torch-Pruning and pydantic (with its
# dependencies) as wheels in .gpu_wheels/ (git-ignored, about 3 MB), downloaded on a machine with network:
#
#   pip download -d .gpu_wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 pydantic
#   pip download -d .gpu_wheels --only-binary=:all: --python-version 3.12 --no-deps torch-pruning
#
# The first brings pydantic, pydantic-core, annotated-types, typing-extensions and typing-inspection (pydantic-core
# is the one compiled wheel, cp312 manylinux x86_64); the second Torch-Pruning alone (its torch is there). This
# script installs whichever of them is needed into a temporary folder put first on PYTHONPATH, nothing else.
# With the device tool: run(command="GPU_CHECK_OUT=$OUT/gpu_check bash benchmarks/gpu_check.sh",
# carry=[".gpu_wheels"], timeout_s=360); the run folder (summary.json, logs, torch_latency.json) comes back.
#
# Rehearsal on a CPU-only machine (the same checks, device cpu; the full quickstart takes a few minutes on 2
# cores, and extra arguments go to compress.py):
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --set train.epochs=1 --set finetune.epochs=1
# GPU_CHECK_HIDE=nncf,onnxruntime makes modules unimportable, as on a machine without them. Without a GPU and
# without GPU_CHECK_DEVICE=cpu, every check says it was skipped for want of CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT

wheels=(.gpu_wheels/*.whl)
if "$python" -c "import pydantic, torch_pruning" 2>/dev/null; then
    echo "wheels: not needed (pydantic and torch_pruning import here)"
elif [ ! -e "${wheels[0]}" ]; then
    echo "wheels: none in .gpu_wheels/ (the checks that need pydantic or torch_pruning are skipped)"
elif "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" >"$site/pip.log" 2>&1; then
    echo "wheels: ${#wheels[@]} from .gpu_wheels/ installed into a temporary folder"
else
    echo "wheels: pip could not install .gpu_wheels/ ($(tail -n 1 "$site/pip.log")); checks that need them are skipped"
fi

PYTHONPATH=".:$site${PYTHONPATH:+:$PYTHONPATH}" "$python" benchmarks/gpu_check.py "$@"
