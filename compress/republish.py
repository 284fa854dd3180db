"""`compress.py report RUN_DIR [--to docs/results/NAME.md] [--title T]`: a finished run's report re-written from its
outputs on disk, by the code that wrote it at the end of the run (`compress.report.run_report` for a pipeline run's
report.md, `compress.study.report.study_markdown` for a study's study.md), so a report can be had again, or
published, without running anything.

With `--to`, the report is published through `compress.results.write_result_report`: its header names the command
that measured the figures, the date, the measuring machine and package versions, as the run recorded them
(`compress.record`), never the `report` command or this machine. A run that recorded no command gets the plain
recipe command rebuilt from its recipe and run directory, marked as such in the header, and the date its results
were last written. The study's figures are copied beside the published file, prefixed with its name, and shown in it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_path, write_text
from .record import Provenance, RecordError, provenance, read_json
from .results import write_result_report

# a study's figures, shown in its published report (each where the study drew it)
STUDY_FIGURES = ("pareto.png", "prune_or_retrain.png")


def _header_machine(made: Provenance, bench_machine: dict | None) -> dict:
    """The machine a published header names: the benchmark's (its CPU and the threads the latencies were timed
    with) where the run benchmarked, else the run's; with the run's GPU where it trained on one."""
    machine = dict(bench_machine or made.machine)
    if made.machine.get("gpu"):
        machine["gpu"] = made.machine["gpu"]
    return machine


def rewrite(run_dir: Path, recipe_path: Path | None = None, overrides: Sequence[str] = ()) -> tuple[
        str, Provenance, dict, list[Path]]:
    """Re-write the report of the finished run or study in `run_dir` (DIR/report.md or DIR/study.md) from its outputs.
    Returns (the report's markdown, how the run was made, the header's machine, the figures the report shows)."""
    from .report import run_report
    from .study.report import read_result, study_markdown

    run_dir = Path(run_dir)
    if (run_dir / "study.json").exists():
        read_json(run_dir / "study.json")  # one line where it cannot be read
        result = read_result(run_dir)
        made = provenance(run_dir, result, run_dir.name, recipe_path, overrides)  # its default out dir: runs/<name>
        text = study_markdown(made.recipe, result)
        write_text(run_dir / "study.md", text)
        figures = [run_dir / name for name in STUDY_FIGURES if (run_dir / name).exists()]
        return text, made, _header_machine(made, result.get("machine")), figures
    if not (run_dir / "summary.json").exists():
        raise RecordError(f"{run_dir} holds neither summary.json nor study.json: not a finished run or study")
    summary = read_json(run_dir / "summary.json")
    if not summary.get("stages"):
        raise RecordError(f"{run_dir / 'summary.json'} records no finished stage: nothing to report")
    made = provenance(run_dir, summary, summary.get("recipe"), recipe_path, overrides)
    text = run_report(made.recipe, summary, run_dir)  # also writes DIR/report.md
    return text, made, _header_machine(made, (summary["stages"].get("bench") or {}).get("machine")), []


def split_title(text: str) -> tuple[str, str]:
    """(the markdown's `# ` title, the rest without it and the blank lines after it)."""
    first, _, rest = text.partition("\n")
    if not first.startswith("# "):
        return "", text
    return first[2:].strip(), rest.lstrip("\n")


def republish(run_dir: Path, to: Path | None = None, title: str | None = None, recipe_path: Path | None = None,
              overrides: Sequence[str] = ()) -> tuple[str, Path | None]:
    """The report of `run_dir`, re-written in place; with `to`, also published there (`write_result_report`, with
    the run's own command, date, machine and packages; figures copied beside it as <to's stem>_<figure>). Returns
    (the text: the published one with `to`, else the report) and the published path (None without `to`)."""
    text, made, machine, figures = rewrite(run_dir, recipe_path, overrides)
    if to is None:
        return text, None
    to = Path(to)
    if to.suffix != ".md":
        raise RecordError(f"--to {to}: a published report is a markdown file (.md)")
    own_title, body = split_title(text)
    shown = []
    for figure in figures:
        copy = to.with_name(f"{to.stem}_{figure.name}")
        with atomic_path(copy) as tmp:
            shutil.copyfile(figure, tmp)
        shown.append(f"![{figure.stem}]({copy.name})")
    if shown:
        body = body.rstrip() + "\n\n## Figures\n\n" + "\n\n".join(shown) + "\n"
    path = write_result_report(to, title or own_title or Path(run_dir).name, body, command=made.command,
                               machine=machine, when=made.date, packages=made.packages)
    return path.read_text(), path
