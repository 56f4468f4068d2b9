"""The project stands on its own docs: nothing in the repository cites a file that is not in it."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("DESIGN.md", "STYLE.md", "published-numbers.md", "../shared")


def test_no_file_cites_notes_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    text_files = [f for f in files if f.endswith((".py", ".md", ".yaml", ".toml", ".txt", ".cfg")) and f != Path(__file__).relative_to(ROOT).as_posix()]
    cited = [(f, name) for f in text_files for name in OUTSIDE if name in (ROOT / f).read_text(errors="ignore")]
    assert not cited, f"cite the repository's own docs (docs/architecture.md) instead: {cited[:5]}"


def test_architecture_page_is_linked_and_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for doc in ("README.md", "CONTRIBUTING.md"):
        assert "docs/architecture.md" in (ROOT / doc).read_text(), doc
    modules = sorted(p.stem for p in (ROOT / "kdbench").glob("*.py") if p.stem not in ("__init__", "__main__"))
    missing = [m for m in modules if f"`{m}.py`" not in page]
    assert not missing, f"docs/architecture.md does not say what these modules are for: {missing}"
