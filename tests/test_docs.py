"""The docs: a short README, every section of the old one kept in a docs page, tables made by the benchmark
scripts, and a site that MkDocs builds strictly (a broken link or a page left out of the nav fails)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS_BEFORE = ROOT / "benchmarks" / "results" / "readme_sections_before.txt"


def headings(text: str) -> list[str]:
    """The text of every Markdown heading outside fenced code."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6} (.+?)\s*#*$", line)):
            found.append(m.group(1).strip())
    return found


def doc_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=300)


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move the detail into a docs/ page"


def test_every_section_of_the_old_readme_is_in_the_readme_or_a_docs_page():
    before = headings(SECTIONS_BEFORE.read_text())
    assert len(before) == 29  # the ## and ### headings of the 1291-line README this split started from
    now = {h for text in doc_texts().values() for h in headings(text)}
    missing = [h for h in before if h not in now]
    assert not missing, f"sections of the old README found in no docs page: {missing}"


def test_the_readme_links_into_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#\s]+)", (ROOT / "README.md").read_text())
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_every_table_block_is_where_the_benchmark_script_writes_it():
    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_tables

    held = readme_tables.blocks_in_docs()
    assert sorted(held) == sorted(readme_tables.BLOCKS)
    assert {"intro", "imagenet"} <= {name for name, files in held.items() if ROOT / "README.md" in files}
    for name, files in held.items():  # a block held twice (README + a page) is the same table in both
        assert len(set(files.values())) == 1, f"block {name} differs between {[str(p) for p in files]}"
        assert all(body.strip() for body in files.values()), f"block {name} is empty"


def test_the_tables_from_kept_results_are_those_results_not_typed():
    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_tables

    held = readme_tables.blocks_in_docs()
    for name, (path, script) in readme_tables.JSON_BLOCKS.items():
        rendered = readme_tables.RENDER[name](json.loads(path.read_text()))
        for doc, body in held[name].items():
            assert body == rendered, f"{doc}: the {name} table differs from {path.name}; " \
                                     f"run python benchmarks/readme_tables.py --blocks {name} --write"


def test_the_imagenet_table_shows_the_benchmarks_numbers():
    sys.path.insert(0, str(ROOT))
    from benchmarks import readme_tables

    result = json.loads(readme_tables.IMAGENET_JSON.read_text())
    rendered = readme_tables.imagenet_table(result)
    assert len(rendered.splitlines()) == 2 + len(readme_tables.IMAGENET_ROWS)
    for r in result["rows"]:
        if r["recipe"] == "edgeres" and r["precision"] == "int8":
            assert f"| {r['top1']:.2f} | **{r['agreement_pct']:.2f}** |" in rendered
    broken = {**result, "rows": [r for r in result["rows"] if r["runtime"] != "LiteRT"]}
    with pytest.raises(SystemExit, match="has no row"):
        readme_tables.imagenet_table(broken)


def test_the_site_builds_strictly(tmp_path):
    r = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("index.html", "convert/index.html", "targets/index.html", "accuracy/index.html",
                 "benchmarks/index.html", "development/index.html", "ARCHITECTURE/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    assert "accuracy_vs_latency.png" in (tmp_path / "site" / "accuracy" / "index.html").read_text()
    assert (tmp_path / "site" / "accuracy_vs_latency.png").is_file()
    # the README is outside the site: its links into docs/ must land on a page and a heading the site has
    for page, anchor in re.findall(r"\]\(docs/([^)#\s]+)\.md(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text()):
        html = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), f"README links docs/{page}.md"
        if anchor:
            assert f'id="{anchor}"' in html.read_text(), f"README links docs/{page}.md#{anchor}: no such heading"


def _site_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path


def test_a_broken_link_fails_the_strict_build(tmp_path):
    copy = _site_copy(tmp_path)
    page = copy / "docs" / "convert.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    r = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "no-such-page.md" in r.stderr


def test_a_broken_anchor_fails_the_strict_build(tmp_path):
    copy = _site_copy(tmp_path)
    page = copy / "docs" / "convert.md"
    page.write_text(page.read_text() + "\nSee [growing](convert.md#no-such-heading).\n")
    r = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "no-such-heading" in r.stderr


def test_a_page_left_out_of_the_nav_fails_the_strict_build(tmp_path):
    copy = _site_copy(tmp_path)
    (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    r = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "orphan.md" in r.stderr
