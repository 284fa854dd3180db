import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# A quickstart-like recipe at tiny widths: every stage finishes in seconds on the 2-core CPU.
TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"num_blocks": [1, 1, 1, 1], "width_multiplier": [0.25, 0.25, 0.25, 0.125], "stem_stride": 2},
    "data": {"kind": "digits", "image_size": 16, "batch_size": 64, "augment": "none"},
    "train": {"epochs": 2, "lr": 0.05},
}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "compress.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(capsys, argv) -> str:
    """Run the CLI in-process; it must fail with exactly one `error:` line and no traceback."""
    from compress.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def tiny_recipe(tmp_path):
    def make(**sections) -> Path:
        recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key].update(value)
            else:
                recipe[key] = value
        return write_recipe(tmp_path / f"{recipe['name']}.yaml", recipe)

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs on a shared 2-core box: one thread is many times faster than two fighting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
