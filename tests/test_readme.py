"""The README's leaderboard excerpt is copied from leaderboard.md: every cell it shows must match."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as a list of rows keyed by header."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            if i > 0 and lines[i - 1].startswith("|"):
                continue
            headers = [h.strip() for h in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, (c.strip() for c in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def test_readme_excerpt_matches_the_leaderboard():
    readme = (ROOT / "README.md").read_text()
    intro = readme.split("An excerpt of `leaderboard.md`", 1)[1]
    heading = intro.split("`", 2)[1]  # the excerpt names its table: "(`mnist1d: cnn1d_w32 → cnn1d_w8`, …"
    track, pair = heading.split(": ")
    excerpt = _tables(intro)[0]
    board_text = (ROOT / "leaderboard.md").read_text()
    section = board_text.split(f"## {track} ", 1)[1].split(f"### {pair}\n", 1)[1].split("\n### ", 1)[0]
    table = next(t for t in _tables(section) if t and "method" in t[0])  # the speed table comes first
    board = {row["method"]: row for row in table}
    assert len(excerpt) >= 3
    for row in excerpt:
        assert {k: board[row["method"]][k] for k in row} == row, "copy the row from leaderboard.md into README.md"
