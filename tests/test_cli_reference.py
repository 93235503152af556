"""The README's CLI reference and the commands' --help name the same options."""

import re
import subprocess
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
COMMANDS = ["dg-export", "dg-run", "dg-quantize", "dg-serve"]


def section(command: str) -> str:
    start = README.index(f"\n## {command}\n")
    return README[start: README.index("\n## ", start + 1)]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_reference_matches_help(command):
    result = subprocess.run([command, "--help"], capture_output=True, text=True)  # as installed
    assert result.returncode == 0, result.stderr
    in_help = set(OPTION.findall(result.stdout)) - {"-h", "--help"}
    text = section(command)
    usage = text[text.index("```") + 3: text.index("```", text.index("```") + 3)]
    missing = sorted(o for o in in_help if o not in set(OPTION.findall(text)))
    assert not missing, f"{command} --help has options the README does not mention: {missing}"
    unknown = sorted(o for o in set(OPTION.findall(usage)) if o not in in_help)
    assert not unknown, f"the README's {command} usage names options --help does not have: {unknown}"
