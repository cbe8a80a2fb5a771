"""README.md's two quick-start commands are the contract with users and CI; keep them honest."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]]


def test_ci_runs_the_readme_test_command_verbatim():
    setup, test = _quick_start_commands()
    assert "tldr-fast demo" in setup
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_no_top_level_kernels_package_is_declared():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"tldr_fast.kernels" = "kernels"' in pyproject
    assert not re.search(r'packages = \[[^\]]*"kernels"', pyproject)
