"""The documentation site builds: ``mkdocs build --strict`` (mkdocs.yml: mkdocs-material, the
API reference from the docstrings through mkdocstrings) passes, so every link of every page, its
anchor included, points at a page, a heading or a repository file that exists. Links to files
outside docs/ (the README, benchmarks/results/...) are brought into the site by
mkdocs_hooks.py; a second, tiny site checks that a broken one still fails the strict build."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(site)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_the_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    done = build(ROOT / "mkdocs.yml", site, ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    for page in ("index.html", "api/index.html", "performance/index.html",
                 "reference/gma_kernels/index.html", "reference/integrations/index.html",
                 "reference/fedsim/index.html", "repo/index.html",
                 "repo/benchmarks/results/index.html"):
        assert (site / page).is_file(), f"the site has no {page}"
    reference = (site / "reference" / "gma_kernels" / "index.html").read_text(encoding="utf-8")
    import gma_kernels
    for name in gma_kernels.__all__:
        assert f'id="gma_kernels.{name}"' in reference, f"the API reference lacks {name}"


def test_a_broken_link_outside_docs_fails_the_strict_build(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Project\n\n## Section\n", encoding="utf-8")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"site_name: t\nhooks:\n  - {ROOT / 'mkdocs_hooks.py'}\n"
                      "validation:\n  anchors: warn\n", encoding="utf-8")
    page = tmp_path / "docs" / "index.md"
    page.write_text("# t\n\n[ok](../README.md#section)\n", encoding="utf-8")
    done = build(config, tmp_path / "site", tmp_path)
    assert done.returncode == 0, done.stderr
    for broken in ("[no](../missing.md)", "[no](../README.md#no-such-section)"):
        page.write_text(f"# t\n\n[ok](../README.md#section) {broken}\n", encoding="utf-8")
        done = build(config, tmp_path / "site", tmp_path)
        assert done.returncode != 0 and "WARNING" in done.stderr, (broken, done.stderr)
