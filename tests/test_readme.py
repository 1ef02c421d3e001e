"""The README is true to the code: its example runs, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_porting_example_runs_and_its_checks_pass():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "torch_to_linen" in b)
    exec(compile(example, "README.md", "exec"), {})


def test_readme_opens_with_the_main_job_and_the_test_command_and_ci_runs_the_latter():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands[0].endswith("python -m compare.run")
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
