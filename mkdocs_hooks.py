"""MkDocs hook (``hooks:`` in mkdocs.yml): the pages' links to repository files outside ``docs/``.

``docs/*.md`` link to ``../README.md`` and to ``../benchmarks/results/...`` as relative paths, so
that they work on GitHub and in a checkout (``tests/test_docs.py`` checks that they resolve).
MkDocs only knows the files under ``docs_dir``: under ``--strict`` such a link fails the build,
and the site would have nothing to link to. This hook brings every repository file that the
pages link to (following the links of the Markdown files it brings, too) into the site under
``repo/<its path in the repository>``: Markdown files as pages outside the nav, other files
(JSON, PNG, TXT, TOML) copied as they are, a linked folder without a README as a generated list
of its files. Each relative link is then rewritten to where its target lies in the site, and
MkDocs validates it as usual: a link to a file that does not exist, or outside the repository,
is left alone and fails the strict build.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

PREFIX = "repo"
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
# an inline code span (left alone), or a link's or an image's target
LINK = re.compile(r"(?P<code>`+)(?:.*?)(?P=code)|(?P<head>!?\[[^\]]*\]\(\s*<?)(?P<target>[^)\s>]+)")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/")

# real path of a page brought from outside docs_dir -> its src_uri in the site
_site_uri: dict[Path, str] = {}


def _prose_lines(text: str, keepends: bool = False):
    """``(line, is_prose)`` for each line of a Markdown text: False for fenced code blocks and
    their fences."""
    in_fence = None
    for line in text.splitlines(keepends=keepends):
        fence = FENCE.match(line)
        if fence:
            ticks = fence.group(1)
            if in_fence is None:
                in_fence = ticks
            elif ticks[0] == in_fence[0] and len(ticks) >= len(in_fence):
                in_fence = None
            yield line, False
        else:
            yield line, in_fence is None


def _links(text: str):
    """The relative link targets of a Markdown text, outside code."""
    for line, prose in _prose_lines(text):
        if prose:
            for match in LINK.finditer(line):
                if match["target"] and not URL.match(match["target"]):
                    yield match["target"]


def _resolve(page: Path, target: str) -> Path:
    return (page.parent / target.split("#")[0]).resolve()


def _uri(root: Path, path: Path) -> str:
    return f"{PREFIX}/{path.relative_to(root).as_posix()}"


def _listing(root: Path, folder: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    lines = [f"# `{rel}/`", "", "The files of this folder of the repository:", ""]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        lines.append(f"* [`{name}`]({name})")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    _site_uri.clear()
    queue = [Path(f.abs_src_path) for f in files.documentation_pages()]
    seen: set[Path] = set(queue)
    while queue:
        page = queue.pop()
        for target in _links(page.read_text(encoding="utf-8")):
            path = _resolve(page, target)
            if path in seen or path.is_relative_to(docs) or not path.is_relative_to(root) \
                    or not path.exists():
                continue  # MkDocs validates these itself
            seen.add(path)
            if path.is_dir():
                index = next((path / n for n in ("index.md", "README.md")
                              if (path / n).is_file()), None)
                if index is not None:
                    members = [index]
                    _site_uri[path] = _uri(root, index)
                else:
                    uri = f"{PREFIX}/{path.relative_to(root).as_posix()}/index.md"
                    files.append(File.generated(config, uri, content=_listing(root, path)))
                    _site_uri[path] = uri
                    members = sorted(p for p in path.rglob("*") if p.is_file())
            else:
                members = [path]
            for file in members:
                seen.add(file)
                if file in _site_uri:
                    continue
                _site_uri[file] = _uri(root, file)
                files.append(File.generated(config, _site_uri[file], abs_src_path=str(file)))
                if file.suffix == ".md":
                    queue.append(file)
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    if page.file.abs_src_path is None:
        return markdown  # a generated folder list: its links are already the site's
    docs = Path(config.docs_dir).resolve()
    source = Path(page.file.abs_src_path).resolve()
    here = posixpath.dirname(page.file.src_uri)

    def site_target(target: str) -> str | None:
        path = _resolve(source, target)
        if path.is_relative_to(docs):
            if source.is_relative_to(docs):
                return None  # docs page to docs page: as written
            uri = path.relative_to(docs).as_posix()
        elif path in _site_uri:
            uri = _site_uri[path]
        else:
            return None  # not found: MkDocs says so
        anchor = target.partition("#")[2]
        rel = posixpath.relpath(uri, here or ".")
        return rel + (f"#{anchor}" if anchor else "")

    def rewrite(match: re.Match) -> str:
        target = match["target"]
        if not target or URL.match(target):
            return match[0]
        new = site_target(target)
        return match[0] if new is None else match["head"] + new

    return "".join(LINK.sub(rewrite, line) if prose else line
                   for line, prose in _prose_lines(markdown, keepends=True))
