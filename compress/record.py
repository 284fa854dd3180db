"""What a run records about how it was made, beside its figures: the command that started it, the date, the machine
(CPU with its family, model and ISA flags, torch threads, the GPU where it trained on one) and the resolved recipe.
A pipeline run keeps it in summary.json under "run", a study in study.json; `compress.py report` and
`compress.py int8-diagnosis` read it back, so that a finished run can be reported or diagnosed from its directory
alone, and a published report names the command that measured its figures, not the one that re-wrote it."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .recipe import Recipe, load_recipe, validate_recipe
from .results import command_line, package_versions
from .runtime.machine import cpu_info


class RecordError(UserError, ValueError):
    """A run directory that cannot be read back (no summary, no recipe), said in one line."""


def invocation(argv: list[str] | None, world_size: int = 1) -> str:
    """The command line of this process as a user types it again from a checkout: `python compress.py` with `argv`,
    compress.py's arguments (None: this process's own, whether it started as compress.py or the installed
    `repvgg-compress`); under torchrun with `world_size` processes, the torchrun line."""
    line = command_line(["compress.py", *(sys.argv[1:] if argv is None else argv)])
    if world_size > 1:
        line = f"torchrun --nproc_per_node {world_size} " + line.removeprefix("python ")
    return line


def run_record(recipe: Recipe, device: torch.device, command: str | None = None) -> dict:
    """The record of a run starting now on `device` under the resolved `recipe`: {command, date, machine, packages,
    recipe} (`command` default: this process's command line)."""
    machine = {**cpu_info(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"command": command or command_line(), "date": datetime.date.today().isoformat(), "machine": machine,
            "packages": package_versions(), "recipe": recipe.model_dump(mode="json")}


@dataclass
class Provenance:
    """How a finished run was made, as read back from its directory: its resolved recipe, the command that made it,
    the date, the machine and the package versions (None: not recorded). `reconstructed`: the run recorded no
    command, so `command` is the plain recipe command rebuilt from the recipe's path and the run directory."""

    recipe: Recipe
    command: str
    date: datetime.date
    machine: dict
    packages: dict[str, str] | None = None
    reconstructed: bool = False


def read_json(path: Path) -> dict:
    """A JSON file of a run directory, or one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RecordError(f"{path} not found: not a finished run directory") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path} cannot be read: {e}") from None


def provenance(run_dir: Path, written: dict, recorded_name: str | None, recipe_path: Path | None = None,
               overrides: Sequence[str] = ()) -> Provenance:
    """How the run in `run_dir` was made, from `written` (its summary.json or study.json, whose mtime dates an
    unrecorded run): its recorded recipe; where it recorded none, the one in `recipe_path` (with `overrides`), else
    in recipes/<`recorded_name`>.yaml."""
    run_dir = Path(run_dir)
    record = written.get("run") or {}
    if "recipe" in record:
        recipe = validate_recipe(record["recipe"])
    else:
        recipe_path = recipe_path or Path("recipes") / f"{recorded_name}.yaml"
        if not recipe_path.is_file():
            raise RecordError(f"{run_dir} records no recipe and {recipe_path} is not here: give --recipe")
        recipe = load_recipe(recipe_path, overrides)
    if "command" in record:
        return Provenance(recipe, record["command"], datetime.date.fromisoformat(record["date"]),
                          record.get("machine") or {}, record.get("packages"))
    source = run_dir / ("summary.json" if (run_dir / "summary.json").exists() else "study.json")
    when = datetime.date.fromtimestamp(source.stat().st_mtime) if source.exists() else datetime.date.today()
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    command = (f"python compress.py --recipe {shlex.quote(str(recipe_path))}{sets} --out {shlex.quote(str(run_dir))}"
               "  # reconstructed from the recipe and run directory: the run recorded no command")
    return Provenance(recipe, command, when, {}, None, reconstructed=True)
