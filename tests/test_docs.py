"""The README's Python snippets run as written, in order, in one namespace (the docs cannot rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_snippets_execute():
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_opens_with_two_self_contained_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[:2]
    assert "pip install -e ." in commands[0] and "rl4diffusion.train" in commands[0]
    assert 'pip install -e ".[dev]"' in commands[1] and "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest" in ci
