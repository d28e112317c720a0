"""The README's module table lists every module of the package, once, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_development_section_lists_every_module_once() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Development") :]
    listed = re.findall(r"^\| `([^`]+\.py)` \|", section, flags=re.M)
    modules = sorted(p.name for p in (ROOT / "flor_lightning").glob("*.py"))
    assert sorted(listed) == modules, (
        f"missing: {sorted(set(modules) - set(listed))}, extra: {sorted(set(listed) - set(modules))}"
    )
    assert len(listed) == len(set(listed))
    layout = section[section.index("```") : section.index("```", section.index("```") + 3)]
    named = set(re.findall(r"\b(_[a-z_]+)\b", layout))
    assert {m.removesuffix(".py") for m in modules if m.startswith("_") and not m.startswith("__")} <= named
