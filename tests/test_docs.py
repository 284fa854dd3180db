"""The front page and the docs keep their promises: a short README that names every recipe, links that lead
somewhere, recipes that name no folder outside the repository, and product text that states rules, not history."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_TEXT = ["README.md", "docs", "compress", "repvgg", "recipes", "benchmarks"]
HISTORY = re.compile(r"\bissues?\b|this VM", re.IGNORECASE)
# an upstream project's issue cited by its number is a reference, not our history
UPSTREAM = re.compile(r"(Torch-Pruning|NNCF|ONNX Runtime|onnxruntime|PyTorch|torch|timm|OpenVINO)\b[^.]*#\d+")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def product_files() -> list[Path]:
    files = []
    for name in PRODUCT_TEXT:
        path = ROOT / name
        if path.is_file():
            files.append(path)
            continue
        files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".sh"}
                  and "results" not in p.relative_to(ROOT).parts and "__pycache__" not in p.parts]
    return files


def test_readme_is_a_front_page_of_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_readme_names_every_recipe():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "recipes").glob("*.yaml")) if f"`{p.name}`" not in readme]
    assert not missing, f"recipes missing from the README's recipe table: {missing}"


def test_no_recipe_names_a_folder_outside_the_repository():
    offenders = [p.name for p in (ROOT / "recipes").glob("*.yaml") if "../" in p.read_text()]
    assert not offenders, offenders


def test_product_text_states_rules_not_history():
    hits = []
    for path in product_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if HISTORY.search(line) and not UPSTREAM.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_relative_links_of_readme_and_docs_lead_to_files():
    broken = []
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_history_check_catches_an_issue_number(tmp_path):
    assert HISTORY.search("fixed in issue 24") and not UPSTREAM.search("fixed in issue 24")
    assert UPSTREAM.search("Torch-Pruning issue #448: grouped convs")
