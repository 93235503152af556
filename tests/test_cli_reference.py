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


def test_readme_python_api_names_every_public_name_and_parameter():
    """Every name dg_runtime exports is in the README's Python API section, and each call the table shows lists the
    parameters its signature has (and only those)."""
    import inspect

    import dg_runtime

    text = section("Python API")
    missing = [name for name in dg_runtime.__all__ if f"`{name}" not in text and f" {name}" not in text]
    assert not missing, f"the README's Python API does not mention {missing}"
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `")]
    calls = re.findall(r"`([\w.]+)\(([^`]*)\)`", " ".join(rows))
    assert len(calls) >= 9, calls
    for name, listed in calls:
        owner, _, attribute = name.rpartition(".")
        target = getattr(getattr(dg_runtime, owner), attribute) if owner else getattr(dg_runtime, attribute)
        params = [p.name for p in inspect.signature(target).parameters.values() if p.name != "self"]
        assert set(params) == set(re.findall(r"\w+", listed)), f"README: {name}({listed}); code: {params}"


def test_readme_python_example_runs(demo_artifact, capsys, monkeypatch):
    text = section("Python API")
    example = text[text.index("```python") + len("```python"): text.index("```", text.index("```python") + 9)]
    monkeypatch.chdir(demo_artifact.parent)
    exec(compile(example.replace('"tiny.dg"', repr(demo_artifact.name)), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("hello alice, nice to meet you\nABCDEFGHIJKLMNOPQRSTUVW\nstop, steps per block")
    assert "SUNSHINE\n" in out and out.rstrip().endswith("shorten the prompt or lower max_new_tokens")
