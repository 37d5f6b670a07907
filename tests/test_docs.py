"""The README stays a short entry point and every page it or the site names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _relative_links(markdown: str) -> list[str]:
    return [t for t in LINK.findall(markdown) if "://" not in t and not t.startswith("mailto:")]


def test_readme_is_short_and_its_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = _relative_links(readme)
    assert "docs/tutorial.md" in links  # the harness really finds links
    missing = [t for t in links if not (ROOT / t).exists()]
    assert missing == []


def test_every_docs_page_is_in_the_site_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert "index.md" in pages
    assert [p for p in pages if f": {p}" not in nav] == []


def test_documented_commands_match_behaviour() -> None:
    """Issue 18: the docs showed a coordinator on 0.0.0.0 without TLS (refused) and a models
    list without mnist-dpcnn."""
    from fedcore.models import available_models
    from fedcore.tls import host_of, is_loopback

    texts = [(ROOT / "README.md").read_text()] + [
        p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
    ]
    commands = [c for t in texts for c in t.replace("\\\n", " ").splitlines() if "fed-server " in c]
    listening = [c for c in commands if "--listen " in c]
    assert any("0.0.0.0" in c for c in listening)  # the harness sees the TLS examples too
    for command in listening:
        address = command.split("--listen ", 1)[1].split()[0]
        plaintext = "--tls-cert" not in command and "--insecure" not in command
        assert not (plaintext and not is_loopback(host_of(address))), command
    models = next(p for t in texts for p in t.split("\n\n") if p.startswith("Models:"))
    assert [m for m in available_models() if f"`{m}`" not in models] == []


def test_the_mlflow_ui_command_installs_the_full_package() -> None:
    """Issue 27: `mlflow ui` from the tracking extra (mlflow-skinny) crashes for lack of
    Flask; the docs' command installs the full package, at the client's version, apart."""
    pins = (ROOT / "pyproject.toml").read_text()
    skinny = re.search(r'"mlflow-skinny==([\d.]+)"', pins)
    assert skinny is not None
    text = (ROOT / "docs" / "reporting.md").read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    ui = [b for b in blocks if "mlflow ui" in b]
    assert ui, "the reporting page shows how to browse MLflow runs"
    for block in ui:
        install = re.search(r"(\S+)/pip install mlflow==([\d.]+)", block)
        assert install is not None, block
        assert install.group(2) == skinny.group(1)
        assert f"{install.group(1)}/mlflow ui" in block  # the UI of that environment


def test_the_docs_say_to_activate_the_environment() -> None:
    """Issue 27: the docs used bare `python` and `fed-*` without saying to activate `.venv`."""
    bare = [
        p.name
        for p in sorted((ROOT / "docs").glob("*.md"))
        if re.search(r"^(fed-(server|worker|query|sim|plan|data)|python) ", p.read_text(), re.M)
    ]
    assert bare, "the harness finds pages with bare commands"
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md", ROOT / "docs" / "tutorial.md"):
        assert "source .venv/bin/activate" in page.read_text().replace("\n", " "), page.name
