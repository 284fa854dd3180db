"""Published results: every figure the README or `docs/` cites lives in a report under `docs/results/`, written by
the command that measured it. Each report opens with that command, the date, the CPU with its family, model and
ISA flags, and the versions of the packages the figures depend on, so a reader can tell whether a figure applies to
their machine and how to measure it again."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import sys
from pathlib import Path

from compress.files import write_text
from compress.runtime.machine import cpu_info, describe_cpu

# The packages whose versions a figure depends on (kernels, quantizer, pruner); absent ones are left out.
PACKAGES = ("torch", "torchvision", "onnxruntime-gpu", "onnxruntime", "openvino", "nncf", "torch-pruning", "timm")


def package_versions() -> dict[str, str]:
    """{package: version} of PACKAGES installed here, with Python's."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again: `argv` (default this process's), shell-quoted, with the
    interpreter named `python` (its path is this machine's, not the reader's)."""
    argv = list(sys.argv if argv is None else argv)
    return " ".join(["python", *map(shlex.quote, argv)])


def report_header(title: str, command: str, machine: dict | None = None, when: datetime.date | None = None,
                  packages: dict[str, str] | None = None) -> str:
    """The opening lines of a result report: its title, the `command` that measured it, the date (`when`, default
    today), the CPU (`machine`: a `machine_info`-like dict of the measuring machine, default this one) and the
    package versions (`packages`: the measuring environment's `package_versions`, default this one's)."""
    machine = cpu_info() if machine is None else machine
    when = when or datetime.date.today()
    versions = ", ".join(f"{name} {version}" for name, version in (packages or package_versions()).items())
    lines = [f"# {title}", "",
             f"- command: `{command}`",
             f"- date: {when.isoformat()}",
             f"- CPU: {describe_cpu(machine)}" + (f", {machine['threads']} threads" if machine.get("threads") else ""),
             f"- packages: {versions}"]
    if machine.get("gpu"):
        lines.insert(-1, f"- GPU: {machine['gpu']}")
    return "\n".join(lines) + "\n\n"


def write_result_report(path: Path, title: str, body: str, command: str | None = None,
                        machine: dict | None = None, when: datetime.date | None = None,
                        packages: dict[str, str] | None = None) -> Path:
    """Write a report to `path` (parents made): `report_header` then `body`, atomically (`files.write_text`), so an
    interrupted write never leaves half a report."""
    path = Path(path)
    write_text(path, report_header(title, command or command_line(), machine, when, packages) + body.rstrip() + "\n")
    return path


class Transcript:
    """A benchmark's printed lines, kept so that `--report PATH` publishes exactly what the terminal showed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        """Print `line` and keep it."""
        print(line, flush=True)
        self.lines.append(line)

    def publish(self, path: Path | None, title: str, machine: dict | None = None) -> None:
        """With `path`, write the kept lines as a result report (a code block: its columns are aligned for a
        terminal, not for markdown) and say where."""
        if path is not None:
            body = "```\n" + "\n".join(self.lines).strip("\n") + "\n```\n"
            print(f"report: {write_result_report(path, title, body, machine=machine)}")
