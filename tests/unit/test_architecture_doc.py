"""docs/architecture.md stays true: it names every contract `make lint` holds, every top-level
package, and only files that exist."""

from __future__ import annotations

import re
import tomllib

from tests.fixtures.servers import ROOT

DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_the_page_names_every_import_contract() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    # a long name is cited by its words up to the first parenthesis
    missing = [c["name"] for c in contracts if c["name"].split(" (")[0] not in DOC]
    assert missing == []


def test_the_page_names_every_top_level_package() -> None:
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["bench", "cli", "sandbox", "services", "shared", "tests", "tools"]
    assert [name for name in packages if f"`{name}/`" not in DOC] == []


def test_every_path_the_page_names_exists() -> None:
    paths = set(re.findall(r"`((?:shared|services|cli|tests|tools|sandbox|docs)/[\w/.]+\.(?:py|md))`", DOC))
    assert paths, "the page names files"
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []
