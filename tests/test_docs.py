"""The docs and docstrings cite the papers and the official repositories, never the project's internal notes.

The internal notes ("spec mcl_okd.md 4.6", "spec/performance.md", "(spec 8.1)", "the spec's reference numbers")
are not in the repository, so a reader cannot follow such a reference. Every fact the code relies on is in
``docs/`` with its primary source (docs/official_code.md, docs/backbones.md, the method pages).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".sh", ".txt", ".cfg", ".toml", ".ini", ".yml", ".yaml"}

# A citation of the internal notes. Python's ``importlib.util.spec_from_file_location`` / ``module_from_spec(spec)``
# and a variable named ``spec`` do not match.
SPEC_CITATION = re.compile(
    r"""\bspec(?:
          \s*/                          # spec/performance.md, spec/README.md
        | \s*`?[\w/]+\.md\b             # spec mcl_okd.md, spec `cmff.md`
        | \s*§                          # spec §4.6
        | \s+(?:sections?|items?)\s+\d  # spec section 6
        | \s+\d                         # spec 4.6, Spec 2.6
        | -\d                           # spec-6 counter
        | 's\b                          # the spec's reference values
    )
    | \(spec\s*$                        # "(spec" at the end of a line, the reference on the next
    | \b(?:the|as\ the|per)\ spec\b     # "as the spec says"
    """,
    re.IGNORECASE | re.MULTILINE | re.VERBOSE,
)


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        paths = [REPO / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside hidden folders
        paths = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [p for p in paths if p.suffix in SUFFIXES and p.is_file() and p.name != Path(__file__).name]


def test_the_pattern_finds_citations_and_ignores_importlib():
    cited = ["(spec 4.6)", "spec mcl_okd.md section 1", "spec `cmff.md` section 6", "spec/performance.md 2.2",
             "Spec 2.6: parameters", "spec section 7", "the spec's reference numbers", "spec-6 counter",
             "as the spec says", "was read for this (spec\n`cmff.md`)", "spec §4.6"]
    for text in cited:
        assert SPEC_CITATION.search(text), text
    code = ["spec = importlib.util.spec_from_file_location('x', path)", "module_from_spec(spec)",
            "spec.loader.exec_module(module)", "a specific rule", "inspect.signature", "SPEC_5 = [", "def test_x_spec():"]
    for text in code:
        assert not SPEC_CITATION.search(text), text


def test_no_file_cites_the_internal_spec():
    files = tracked_files()
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".py" for p in files)
    hits = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in SPEC_CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            hits.append(f"{path.relative_to(REPO)}:{line}: {text.splitlines()[line - 1].strip()}")
    assert not hits, ("cite the paper (title, venue, section/equation/table) or the official repository file "
                      "(owner/repo and path) instead, and put the fact in docs/:\n" + "\n".join(hits))


METHOD_NAMES = {"baseline": "baseline", "DML": "dml", "CL-ILR": "cl_ilr", "ONE": "one", "OKDDip": "okddip",
                "MCL-OKD": "mcl_okd", "FFL": "ffl", "DCCL": "dccl", "CMFF": "cmff", "KDCL": "kdcl", "PCL": "pcl",
                "AMLN": "amln"}


def _named_methods(cell: str) -> set[str]:
    """The methods a table cell names: 'every method', 'every method but X', or a list 'A, B, C'."""
    if cell.startswith("every method"):
        but = re.findall(r"[\w-]+", cell[len("every method but"):])
        return set(METHOD_NAMES.values()) - {METHOD_NAMES[n] for n in but if n in METHOD_NAMES}
    return {METHOD_NAMES[n.strip()] for n in cell.split(",")}


def test_the_contract_tables_name_the_methods_that_use_each_attribute_and_hook():
    """docs/engine.md says, for every class attribute and hook of engine.Method, which method scripts set or
    override it; each list is what the scripts do."""
    from engine.method import Method, load_method
    text = (REPO / "docs" / "engine.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| `") and line.count("|") >= 4]
    documented = set()
    for row in rows:
        names = re.findall(r"`(\w+)", row[0])
        if not names or not all(hasattr(Method, n) for n in names):
            continue                         # another table of the page
        documented.update(names)
        users = {m for m in METHOD_NAMES.values() if any(n in vars(load_method(m)) for n in names)}
        assert _named_methods(row[-1]) == users, (row[0], sorted(users))
    public = {n for n, v in vars(Method).items() if not n.startswith("_") and n not in ("name", "script")}
    assert public <= documented, sorted(public - documented)
