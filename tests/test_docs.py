"""The README's targets table is generated from nothing but must match TARGETS, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from edgevit.export.targets import TARGETS

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block(name: str) -> str:
    """A marked block of the README, or of a page in docs/ (reference tables moved there)."""
    text = README.read_text() + "".join(p.read_text() for p in sorted((README.parent / "docs").glob("*.md")))
    match = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_readme_targets_table_matches_the_table() -> None:
    rows = [line for line in _readme_block("targets-table").splitlines() if line.startswith("| ")][1:]
    expected = [
        f"| {t.name} | {t.suffix} | {t.converter} | {t.runtime} | "
        f"{', '.join([t.default_precision, *[p for p in t.precisions if p != t.default_precision]])} | "
        f"{', '.join(a.name for a in t.accelerators)} | {t.extra} |"
        for t in TARGETS.values()
    ]
    assert rows == expected


def test_readme_has_the_two_setup_commands() -> None:
    for name in ("main-command", "test-command"):
        commands = [ln for ln in _readme_block(name).splitlines() if ln and not ln.startswith("```")]
        assert len(commands) == 1 and commands[0].startswith("python3.11 -m venv .venv && ")
    assert "edgevit export deit_tiny --target all" in _readme_block("main-command")


def test_readme_known_failures_match_the_table() -> None:
    from edgevit.export.known_failures import KNOWN_FAILURES

    section = README.read_text().split("### Known failures", 1)[1].split("## ", 1)[0]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]) for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| model", "|---"))}
    assert rows == set(KNOWN_FAILURES)


def passes_table_rows() -> list[str]:
    """The README's passes table, as the registry and the targets table define it."""
    from edgevit.export.passes import ORDER, PASSES, default_pipeline

    pairs = [(t.name, a.name) for t in TARGETS.values() for a in t.accelerators]
    rows = []
    for name in ORDER:
        cls = PASSES[name]
        where = [f"{t}:{a}" for t, a in pairs if name in default_pipeline(t, a)]
        where_text = "all" if len(where) == len(pairs) else ", ".join(where)
        summary = cls.summary().replace("|", "\\|")
        rows.append(f"| `{name}` | {'exact' if cls.exact else 'approximate'} | {where_text} | {summary} |")
    return rows


def test_readme_passes_table_matches_the_registry() -> None:
    rows = [line for line in _readme_block("passes-table").splitlines() if line.startswith("| ")][1:]
    assert rows == passes_table_rows()


def test_workflows_run_tests_and_options_that_exist() -> None:
    """The GitHub workflows name test files, pytest options and markers; a rename must not leave them
    running nothing (pytest would exit 4 or 5 there, long after the change that broke them)."""
    import tomllib

    root = README.parent
    markers = {m.split(":")[0] for m in tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    conftest = (root / "tests" / "conftest.py").read_text()
    commands = [ln for wf in sorted((root / ".github" / "workflows").glob("*.yml"))
                for ln in wf.read_text().splitlines() if "pytest " in ln and "run:" in ln]
    assert any("--full-zoo" in c for c in commands), "the full-zoo cells run in no workflow"
    for command in commands:
        for path in re.findall(r"tests/\S+\.py", command):
            assert (root / path).is_file(), f"{path} (in a workflow) does not exist"
        for option in re.findall(r"(?<=\s)--[a-z][a-z-]+", command):
            assert option in ("--junitxml",) or f'"{option}"' in conftest, f"unknown pytest option {option}"
        for marker in re.findall(r"-m (\w+)", command):
            assert marker in markers, f"marker {marker} is not registered"
