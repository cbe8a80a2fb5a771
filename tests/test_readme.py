"""README.md's two quick-start commands are the contract with users and CI; keep them honest."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_readme_is_a_guide_of_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (
                f"{page.relative_to(ROOT)} links to missing {target}"
            )


@pytest.mark.slow
def test_the_python_api_example_runs(tmp_path):
    """The README's Python block, run as a user would paste it (in a fresh directory)."""
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "api" / "images.safetensors").is_file()
