"""The README is true to the code: its example runs, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_main_job_and_the_test_command_and_ci_runs_the_latter():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands[0].endswith("python -m compare.run")
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_oldest_versions_in_the_readme_are_the_lower_bounds_of_pyproject():
    """One place for the bounds (pyproject.toml); the README's 'oldest' row must say the same."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", d.split("#")[0].strip()).groups() for d in deps)
    header = next(line for line in README.splitlines() if line.startswith("| | python"))
    row = next(line for line in README.splitlines() if line.startswith("| oldest"))
    names = [c.strip().split(" /")[0] for c in header.strip("|").split("|")][2:]
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert dict(zip(names, cells, strict=True)) == bounds  # every dependency, nothing else


def test_the_three_packages_carry_one_version_and_the_changelog_and_citation_name_it():
    import compare
    import flaxbn
    import torchbn

    assert compare.__version__ == flaxbn.__version__ == torchbn.__version__
    assert f"## {compare.__version__} " in (ROOT / "CHANGELOG.md").read_text()
    assert f"version: {compare.__version__}" in (ROOT / "CITATION.cff").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_the_readmes_claims_section_is_generated_from_the_committed_run():
    """``python -m compare.report.lesson results/cpu-2core-x86_64/claims-confirmation/results.json
    --readme README.md`` rewrites it from the confirmatory run; hand edits fail here."""
    from compare.report import lesson

    results = ROOT / "results" / "cpu-2core-x86_64" / "claims-confirmation" / "results.json"
    assert lesson.main([str(results), "--readme", str(ROOT / "README.md"), "--check"]) == 0
