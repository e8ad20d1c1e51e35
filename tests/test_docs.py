"""The docs site: it builds with warnings as errors, every page can be reached, the README
stays short and its links resolve, and the configuration page names every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Variables the docs name that are not settings: the test suite's own, and a placeholder.
NOT_SETTINGS = {"RELAY_TEST_AMQP_URL", "RELAY_TEST_POSTGRES_URL", "RELAY_SCREENSHOT", "RELAY_X"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with `--strict` (a warning fails the build) into a tmp dir."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def nav_pages(nav: object) -> set[str]:
    """Every page file named in mkdocs.yml's nav, however deep."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return {page for item in nav for page in nav_pages(item)}
    if isinstance(nav, dict):
        return {page for value in nav.values() for page in nav_pages(value)}
    return set()


def readme_links() -> list[str]:
    """The relative link targets of the README, anchors cut off."""
    targets = (target.split("#")[0] for target in LINK.findall(README.read_text()))
    return [target for target in targets if target and "://" not in target]


def test_the_site_builds_with_warnings_as_errors(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "api" / "openapi.json").is_file()


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_every_readme_link_resolves() -> None:
    links = readme_links()
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), link


def test_every_docs_page_is_in_the_nav_or_linked_from_the_readme() -> None:
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    linked = {link.removeprefix("docs/") for link in readme_links()}
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        assert name in nav or name in linked, f"docs/{name} is reached from nowhere"
    for name in nav:
        assert (DOCS / name).is_file(), f"the nav names docs/{name}, which does not exist"


def test_the_configuration_page_names_every_setting(site: Path) -> None:
    page = (site / "configuration" / "index.html").read_text()
    for name in Settings.model_fields:
        assert f"RELAY_{name.upper()}" in page, name


def test_every_api_route_is_on_an_api_page(site: Path) -> None:
    from relay.ingress.openapi import openapi_document

    pages = "".join(
        (site / "api" / part / "index.html").read_text()
        for part in ("", "messaging", "conversations", "admin")
    )
    text = re.sub(r"<[^>]+>", "", pages)
    for path in openapi_document()["paths"]:
        assert path in text, path


def test_every_relay_variable_the_docs_name_is_a_setting() -> None:
    # A misspelt or removed name in prose misleads as much as in a value.
    fields = set(Settings.model_fields)
    for path in [README, ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]:
        for name in set(re.findall(r"\bRELAY_[A-Z0-9_]+", path.read_text())) - NOT_SETTINGS:
            assert name.removeprefix("RELAY_").lower() in fields, f"{path.name}: {name}"
