"""The bad-input sweep: a fixed-seed generator mutates the quickstart recipe (wrong types, out-of-range and
non-finite numbers, unknown and misspelt keys at every depth, duplicate keys, syntax errors, undecodable and
missing files, conflicting settings, and valid changes) and loads each mutant as `--dry-run` does. Every mutant is
either accepted or refused with exactly one `error:` line naming its culprit, never a traceback; accepted mutants
also run end to end at tiny widths. Then a truncated checkpoint and a truncated ONNX file in that run directory
each stop a run in one line that names the file and what to do, and leave nothing half-written."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
import traceback
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml
from conftest import ROOT

from compress.cli import main
from compress.recipe.errors import section_of
from compress.recipe.schema import Recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SEED = 1234
MUTANTS = 240
RUNS = 5
# tiny settings every end-to-end run takes (except at its mutated key): the suite's TINY widths, one epoch, small
# samples, a one-round bench, and fewer exported files
TINY_RUN = {
    "device": "cpu",
    "model": {"num_blocks": [1, 1, 1, 1], "width_multiplier": [0.25, 0.25, 0.25, 0.125], "stem_stride": 2},
    "data": {"image_size": 16, "workers": 0, "test_subset": 96},
    "train": {"epochs": 1, "warmup_epochs": 0},
    "prune": {"round_to": 4, "gradient_batches": 1, "reconstruct_images": 64, "sensitivity_images": 64},
    "finetune": {"epochs": 1, "warmup_epochs": 0},
    "quantize": {"mode": "ptq", "calibration_size": 32, "epochs": 1},
    "export": {"artifacts": ["plain_fp32", "pruned_int8"], "eval_subset": 64, "parity_images": 64},
    "bench": {"batch_sizes": [1], "main_batch": None, "warmup": 1, "iters": 2, "rounds": 1, "max_rounds": None,
              "providers": ["cpu"]},
}
# stages whose sections an end-to-end run may mutate, the latest first: a shared run directory then recomputes
# only from the mutated stage on
RUN_SECTIONS = ("bench", "export", "quantize", "finetune", "prune")


@dataclass
class Mutant:
    kind: str
    label: str
    culprit: tuple[str, ...]  # the error line must name one of these (a dotted key names its section and leaf)
    also: str = ""  # and hold this
    content: bytes | None = None  # the file's bytes; None: no file at that path
    raw: dict | None = None  # the mutated recipe data, for a value mutant
    key: str | None = None  # the dotted key it changes
    as_dir: bool = False  # the recipe path is a directory


def _leaves(cls, path=()) -> list[tuple[tuple[str, ...], object]]:
    """(dotted path, pydantic field) of every key of the schema, sections included."""
    out = []
    for name, field in cls.model_fields.items():
        out.append(((*path, name), field))
        section = section_of(field.annotation)
        if section is not None:
            out.extend(_leaves(section, (*path, name)))
    return out


KEYS = [(path, field) for path, field in _leaves(Recipe) if path != ("name",)]
FIELDS = {path: field for path, field in KEYS}


def _get(raw: dict, path):
    node = raw
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(raw: dict, path, value) -> dict:
    raw = json.loads(json.dumps(raw))  # a deep copy
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return raw


def _literal_choices(annotation) -> list:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) for c in _literal_choices(arg)]


def _table_names(field) -> list[str]:
    checks = [m.func for m in field.metadata if hasattr(getattr(m, "func", None), "names")]
    return checks[0].names() if checks else []


def _valid_change(path, field, current):
    """A value near the current one, of the field's type, that the schema should take (None when there is none)."""
    value = current if current is not None else field.default
    choices = _literal_choices(field.annotation) or _table_names(field)
    if choices:
        others = [c for c in choices if c != value]
        return others[0] if others else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    return None


def _typo(rng: random.Random, word: str, taken) -> str:
    while True:
        i = rng.randrange(len(word))
        edit = rng.choice(("drop", "double", "swap"))
        if edit == "drop" and len(word) > 2:
            typo = word[:i] + word[i + 1:]
        elif edit == "swap" and i + 1 < len(word):
            typo = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        else:
            typo = word[:i] + word[i] + word[i:]
        if typo != word and typo not in taken:
            return typo


def _dump(raw: dict) -> bytes:
    return yaml.safe_dump(raw, sort_keys=False).encode()


def _duplicate_line(rng: random.Random, text: str) -> tuple[str, str]:
    """`text` with one `key: value` line repeated right after itself, and that key's dotted path."""
    lines, stack, candidates = text.splitlines(), [], []
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":", 1)[0]
        stack.append((indent, key))
        candidates.append((i, ".".join(k for _, k in stack)))
    i, dotted = rng.choice(candidates)
    return "\n".join([*lines[: i + 1], lines[i], *lines[i + 1:]]) + "\n", dotted


CONFLICTS = [  # (changes, culprit names)
    ({("prune", "keep_latency"): 0.5}, ("keep_macs", "keep_latency")),
    ({("prune", "target_ms"): 3.0}, ("keep_macs", "target_ms")),
    ({("prune", "channel_ratio"): 0.3}, ("keep_macs", "channel_ratio")),
    ({("model", "widths"): [16, 16, 32, 64, 128]}, ("width_multiplier", "widths")),
    ({("model", "pretrained"): "timm", ("model", "checkpoint"): "m.pt"}, ("pretrained", "checkpoint")),
    ({("train", "distill"): {"alpha": 0.5}}, ("distill", "teacher")),
    ({("prune", "mode"): "multibranch", ("finetune", "structure"): "rebranch"}, ("finetune.structure",)),
    ({("prune", "mode"): "multibranch", ("prune", "reconstruct"): True}, ("prune.reconstruct",)),
    ({("export", "stem"): "space_to_depth"}, ("export.stem", "stem_stride")),
    ({("export", "stem_fp32"): "space_to_depth"}, ("export.stem_fp32", "stem_stride")),
    ({("bench", "main_batch"): 8}, ("bench.main_batch",)),
    ({("bench", "max_rounds"): 2}, ("bench.max_rounds",)),
    ({("train", "warmup_epochs"): 7}, ("train.warmup_epochs",)),
    ({("study",): {"keep_macs": [0.5, 0.5]}}, ("study.keep_macs",)),
    ({("study",): {"strategies": ["plain", "plain"]}}, ("study.strategies",)),
    ({("study",): {"seeds": 3}, ("seed",): 18446744073709550}, ("study.seeds",)),
    ({("model", "num_blocks"): [1, 2]}, ("model.num_blocks",)),
    ({("model", "width_multiplier"): [0.001, 0.5, 0.5, 0.5]}, ("model.width_multiplier",)),
    ({("model", "override_groups_map"): {1: 3}}, ("model",)),
    ({("model", "override_groups_map"): {40: 2}}, ("model.override_groups_map",)),
    ({("data", "kind"): "imagefolder"}, ("data.root",)),
    ({("seed",): 2**64}, ("seed",)),
    ({("seed",): -1}, ("seed",)),
    ({("stages",): []}, ("stages",)),
]


def _misspelt(rng: random.Random, base: dict, path: tuple[str, ...]) -> Mutant:
    """The quickstart with the key at `path` misspelt (a typo no sibling key has)."""
    parent = _get(base, path[:-1]) if path[:-1] else base
    typo = _typo(rng, path[-1], set(parent))
    raw = json.loads(json.dumps(base))
    node = _get(raw, path[:-1]) if path[:-1] else raw
    node[typo] = node.pop(path[-1])
    return Mutant("misspelt key", f"{'.'.join(path)} -> {typo}", (".".join((*path[:-1], typo)),),
                  also=f"did you mean '{path[-1]}'", raw=raw)


def generate(seed: int = SEED, count: int = MUTANTS) -> list[Mutant]:
    """`count` mutants of the quickstart recipe, the same for the same seed."""
    rng = random.Random(seed)
    text = QUICKSTART.read_text()
    base = yaml.safe_load(text)
    mutants = [Mutant("missing file", "no such file", ("not found",)),
               Mutant("missing file", "a directory", ("not found",), as_dir=True),
               Mutant("undecodable", "UTF-16", ("UTF-8",), content=text.encode("utf-16")),
               Mutant("structure", "a list", ("mapping",), content=b"- train\n- prune\n")]
    mutants += [Mutant("conflict", ", ".join(".".join(p) for p in changes), culprit, raw=_apply(base, changes))
                for changes, culprit in CONFLICTS]
    given = [p for p in FIELDS if _get(base, p) is not None]
    # a misspelt key at every depth the quickstart has (top level, a section, a nested section), whatever the draw
    # (their own generator: the draws below stay as they are)
    depths = random.Random(seed + 1)
    mutants += [_misspelt(depths, base, next(p for p in given if len(p) == depth)) for depth in (1, 2, 3)]
    # and an unknown key at every depth, whatever the draw and however many fields the schema has
    mutants += [Mutant("unknown key", f"{'.'.join(section) or 'top level'} beside colour",
                       (".".join((*section, "colour")),), raw=_set(base, (*section, "colour"), 1))
                for section in ((), ("train",), ("prune", "latency"))]
    kinds = ("wrong type", "out of range", "non-finite", "unknown key", "misspelt key", "duplicate key",
             "syntax error", "undecodable", "valid change", "section shape")
    while len(mutants) < count:
        kind = rng.choice(kinds)
        path, field = rng.choice(KEYS)
        dotted = ".".join(path)
        current = _get(base, path)
        if kind == "wrong type":
            value = rng.choice(["text", [1, 2], {"k": 1}, True, 3.5, -7, None])
            mutants.append(Mutant(kind, f"{dotted}={value!r}", (dotted,), raw=_set(base, path, value), key=dotted))
        elif kind == "out of range":
            value = rng.choice([-1, 0, 10**30, -(10**30), 1e300, 2**64, -0.5, 1.5])
            mutants.append(Mutant(kind, f"{dotted}={value!r}", (dotted,), raw=_set(base, path, value), key=dotted))
        elif kind == "non-finite":
            value = rng.choice([math.nan, math.inf, -math.inf])
            mutants.append(Mutant(kind, f"{dotted}={value!r}", (dotted,), raw=_set(base, path, value), key=dotted))
        elif kind == "unknown key":
            section = path[:-1]
            mutants.append(Mutant(kind, f"{dotted} beside colour", (".".join((*section, "colour")),),
                                  raw=_set(base, (*section, "colour"), 1)))
        elif kind == "misspelt key":  # a key the quickstart gives, at its depth
            mutants.append(_misspelt(rng, base, rng.choice(given)))
        elif kind == "duplicate key":
            duplicated, key = _duplicate_line(rng, text)
            mutants.append(Mutant(kind, key, (key,), also="given twice", content=duplicated.encode()))
        elif kind == "syntax error":
            lines = text.splitlines()
            i = rng.randrange(1, len(lines))
            broken = rng.choice(["key: [1, 2", "\tkey: 1", "key: {a: 1", "key: 'unclosed", "- item"])
            lines.insert(i, broken)
            mutants.append(Mutant(kind, f"line {i + 1}: {broken!r}", ("line",), content="\n".join(lines).encode()))
        elif kind == "undecodable":
            data = bytearray(text.encode())
            data.insert(rng.randrange(len(data)), rng.choice([0xFF, 0xFE, 0xC3, 0x80]))
            mutants.append(Mutant(kind, f"byte at {len(data)}", ("UTF-8",), content=bytes(data)))
        elif kind == "valid change":
            value = _valid_change(path, field, current)
            if value is None or section_of(field.annotation) is not None:
                continue
            mutants.append(Mutant(kind, f"{dotted}={value!r}", (dotted,), raw=_set(base, path, value), key=dotted))
        elif kind == "section shape":
            if section_of(field.annotation) is None:
                continue
            value = rng.choice([[1], "text", 5])
            mutants.append(Mutant(kind, f"{dotted}={value!r}", (dotted,), raw=_set(base, path, value), key=dotted))
    return mutants


def _apply(base: dict, changes: dict) -> dict:
    raw = base
    for path, value in changes.items():
        raw = _set(raw, path, value)
    return raw


def _cli(argv: list[str]) -> tuple[int | None, str, str]:
    """`compress.cli.main` in-process: (exit code, stdout, stderr); an escaped exception is its traceback (None)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException:  # noqa: B036 - SystemExit from argparse included: every escape is a finding
            return None, out.getvalue(), err.getvalue() + traceback.format_exc()
    return code, out.getvalue(), err.getvalue()


def _names(line: str, culprit: tuple[str, ...]) -> bool:
    """The error line names one of the culprits: a dotted key as itself, or as its section beside its leaf."""
    for name in culprit:
        *section, leaf = name.split(".")
        if name in line or (section and ".".join(section) in line and leaf in line):
            return True
    return False


def _write(mutant: Mutant, folder: Path, i: int) -> Path:
    path = folder / f"m{i}.yaml"
    if mutant.as_dir:
        path.mkdir()
    elif mutant.raw is not None:
        path.write_bytes(_dump(mutant.raw))
    elif mutant.content is not None:
        path.write_bytes(mutant.content)
    return path


def _run_recipe(mutant: Mutant) -> dict:
    """The mutant at tiny widths: TINY_RUN everywhere but at its mutated key."""
    raw = json.loads(json.dumps(mutant.raw))
    for section, values in TINY_RUN.items():
        if not isinstance(values, dict):
            raw[section] = values if section != mutant.key else raw[section]
            continue
        raw.setdefault(section, {})
        for key, value in values.items():
            if f"{section}.{key}" != mutant.key:
                raw[section][key] = value
    raw["name"] = "sweep"
    return raw


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_every_mutant_is_accepted_or_refused_in_one_line_and_accepted_ones_run(tmp_path, one_thread):
    mutants = generate()
    assert len(mutants) >= 200
    assert generate() == mutants  # fixed seed: the same sweep every time
    outcomes, findings, accepted = Counter(), [], []
    for i, mutant in enumerate(mutants):
        path = _write(mutant, tmp_path, i)
        code, out, err = _cli(["--recipe", str(path), "--dry-run"])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if code == 0 and not errors and out.splitlines()[-1].startswith("plan: "):
            outcomes["accepted"] += 1
            accepted.append(mutant)
        elif (code == 2 and len(errors) == 1 and "Traceback" not in err and _names(errors[0], mutant.culprit)
              and mutant.also in errors[0]):
            outcomes["refused"] += 1
        else:
            findings.append(f"{mutant.kind} {mutant.label}: exit {code}\n{err[-1500:]}")
        outcomes[f"{mutant.kind}: {'accepted' if accepted and accepted[-1] is mutant else 'refused'}"] += 1
    print(f"\n{len(mutants)} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert not findings, "\n\n".join(findings)
    assert outcomes["accepted"] + outcomes["refused"] == len(mutants)
    # every kind of bad input is refused; the valid changes are taken
    for kind in ("non-finite", "unknown key", "misspelt key", "duplicate key", "syntax error",
                 "undecodable", "missing file", "conflict", "section shape"):
        assert outcomes[f"{kind}: accepted"] == 0 and outcomes[f"{kind}: refused"] > 0, kind
    assert outcomes["valid change: accepted"] >= RUNS
    for kind in ("unknown key", "misspelt key"):  # at every depth: top level, a section, a nested section
        assert {m.culprit[0].count(".") for m in mutants if m.kind == kind} == {0, 1, 2}, kind

    # accepted mutants run end to end, one run directory shared (each recomputes from its mutated stage on)
    runnable = [m for m in accepted if m.kind == "valid change" and m.key.split(".")[0] in RUN_SECTIONS
                and m.key.split(".")[-1] not in ("device", "target_device", "stem", "stem_fp32", "provider")]
    picked = []
    for section in RUN_SECTIONS:
        picked += [m for m in runnable if m.key.split(".")[0] == section and m not in picked][:1]
    picked += [m for m in runnable if m not in picked]
    assert len(picked) >= RUNS
    out_dir = tmp_path / "run"
    ran, stopped = [], []
    for mutant in picked:
        if len(ran) == RUNS:
            break
        recipe = tmp_path / f"run{len(ran)}.yaml"
        recipe.write_bytes(_dump(_run_recipe(mutant)))
        code, _, err = _cli(["--recipe", str(recipe), "--out", str(out_dir)])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if code == 2 and len(errors) == 1 and "Traceback" not in err and mutant.key.split(".")[-1] in errors[0]:
            stopped.append(mutant.label)  # a value the schema takes but this model cannot meet: one line naming it
            continue
        assert code == 0, f"{mutant.label} was accepted but does not run:\n{err[-3000:]}"
        stages = json.loads((out_dir / "summary.json").read_text())["stages"]
        assert list(stages) == list(Recipe.model_fields["stages"].default_factory()), mutant.label
        ran.append(mutant.label)
    assert len(ran) == RUNS and len(stopped) <= 1, (ran, stopped)
    print(f"ran end to end: {', '.join(ran)}; stopped in one line: {', '.join(stopped) or 'none'}")

    # a truncated checkpoint in the run directory: one line naming it and what to do; nothing half-written
    last = ["--recipe", str(tmp_path / f"run{RUNS - 1}.yaml"), "--out", str(out_dir)]
    plain, pruned = out_dir / "plain.pt", out_dir / "pruned.pt"
    plain.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
    before = pruned.read_bytes()
    code, _, err = _cli([*last, "--set", "prune.keep_macs=0.6"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(plain) in errors[0] and "damaged or truncated" in errors[0] and "delete it" in errors[0]
    assert "weights_only" not in err
    assert pruned.read_bytes() == before and not _temp_files(out_dir)
    plain.unlink()  # as the line says: the next run recomputes it

    # a truncated ONNX file: likewise, and its remedy (delete the onnx folder) makes the export stage rerun
    code, _, err = _cli(last)
    assert code == 0, err[-3000:]
    onnx_file = out_dir / "onnx" / "pruned_int8.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    summary = (out_dir / "summary.json").read_bytes()
    code, _, err = _cli([*last, "--set", "bench.iters=3"])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(onnx_file) in errors[0] and f"delete {out_dir / 'onnx'}" in errors[0]
    assert "rerun the export stage" in errors[0]
    assert (out_dir / "summary.json").read_bytes() == summary and not _temp_files(out_dir)
    shutil.rmtree(out_dir / "onnx")  # as the line says: the export stage reruns, and the bench with it
    code, _, err = _cli([*last, "--set", "bench.iters=3"])
    assert code == 0 and "[export] running" in err, err[-3000:]
