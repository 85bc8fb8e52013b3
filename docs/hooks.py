"""MkDocs hook (mkdocs.yml: ``hooks:``): the pages that are generated from the code, at build time.

- ``<!-- config-table: DistillConfig -->`` in a page becomes the table of that dataclass of
  ``components/training/schema.py``: each key's type, allowed range, default, and the comment
  written beside the field in the source, then one table per nested section (``data``,
  ``quantization``, ``stages``...). The schema stays the one source: nothing here lists a key.
- ``<!-- shipped-configs -->`` becomes a table of ``configs/*.yaml`` and each file's header.
- ``<!-- api: components.models -->`` becomes one mkdocstrings block (``::: module``) per module
  of that package, so a module added, moved or removed needs no edit here.
- ``benchmarks/README.md`` is published as the page ``benchmarks.md``.
"""

import ast
import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- config-table: (\w+) -->$", re.M)
API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.M)


def _schema():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from components.training import schema

    return schema


def _comments(cls) -> dict:
    """Field name -> the comment lines right above it plus the comment at the end of its line(s)."""
    source, first = inspect.getsourcelines(cls)
    lines = "".join(source).splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO("".join(source)).readline)
        if tok.type == tokenize.COMMENT
    }
    whole_line = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    out = {}
    for node in ast.parse("".join(source)).body[0].body:
        if isinstance(node, ast.AnnAssign):
            above, n = [], node.lineno - 1
            while n in whole_line:
                above.insert(0, comments[n])
                n -= 1
            trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            out[node.target.id] = " ".join(above + trailing)
    return out


def _type(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is typing.Any:
        return "any"
    if dataclasses.is_dataclass(t):
        return "section"
    if isinstance(t, type) and t.__name__ == "Component":
        return "component"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        return " | ".join("null" if a is type(None) else _type(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"dict[{_type(args[0])}, {_type(args[1])}]"
    return getattr(t, "__name__", str(t))


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict) and "_component_" in value:  # a builder: name(arguments)
        arguments = ", ".join(f"{k}={_yaml(v)}" for k, v in value.items() if k != "_component_")
        return f"{value['_component_']}({arguments})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _default(f, section: bool) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_yaml(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return "see below" if section else f"`{_yaml(f.default_factory())}`"
    return "required"


def _range(meta) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"{low} ≤ x {'<' if meta.get('high_open') else '≤'} {high}"
    return f"≥ {low}" if low is not None else ""


def _text(comment: str) -> str:
    """Markdown-safe prose: escape what would turn into emphasis, HTML or a column outside `code`."""
    parts = re.split(r"(`[^`]*`)", comment)
    escape = lambda s: re.sub(r"([_*|\\])", r"\\\1", s).replace("<", "&lt;")  # noqa: E731
    return "".join(p if p.startswith("`") else escape(p) for p in parts)  # a table keeps `a | b` whole


def _nested(t):
    """The dataclass a field's type holds (DataConfig, Optional[List[StageConfig]]...), if any."""
    if dataclasses.is_dataclass(t):
        return t
    return next((d for d in map(_nested, typing.get_args(t)) if d is not None), None)


def _tables(cls, prefix: str = "", level: int = 3) -> str:
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    rows, sections = ["| key | type | default | meaning |", "|---|---|---|---|"], []
    for f in dataclasses.fields(cls):
        inner = _nested(hints[f.name])
        kind = f"`{_type(hints[f.name])}`" + (f", {_range(f.metadata)}" if _range(f.metadata) else "")
        default = _default(f, inner is not None)
        rows.append(f"| `{prefix}{f.name}` | {kind} | {default} | {_text(comments.get(f.name, ''))} |")
        if inner is not None:
            sections.append((f"{prefix}{f.name}" + ("[]" if "list[" in _type(hints[f.name]) else ""), inner))
    doc = cls.__doc__ or ""
    out = ["" if doc.startswith(cls.__name__ + "(") else _text(inspect.cleandoc(doc))]  # not dataclass's own
    out.append("\n".join(rows))
    for key, inner in sections:
        out.append(f"{'#' * level} `{key}`\n\n{_tables(inner, key + '.', level + 1)}")
    return "\n\n".join(s for s in out if s)


def _shipped_configs() -> str:
    rows = ["| config | what it runs |", "|---|---|"]
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or line.strip() == "#":
                break
            header.append(line.lstrip("#").strip())
        rows.append(f"| `configs/{path.name}` | {_text(' '.join(header).rstrip(':'))} |")
    return "\n".join(rows)


def _api(match) -> str:
    """``::: name`` for a module, or for each module of a package (its own docstring first)."""
    name = match.group(1)
    folder = ROOT.joinpath(*name.split("."))
    if not folder.is_dir():
        if not folder.with_suffix(".py").is_file():
            raise ValueError(f"<!-- api: {name} -->: no module or package {name}")
        return f"::: {name}"
    blocks = []
    if ast.get_docstring(ast.parse((folder / "__init__.py").read_text())):
        blocks.append(f"::: {name}\n    options:\n      members: false")
    blocks += [f"::: {name}.{path.stem}" for path in sorted(folder.glob("*.py")) if path.stem != "__init__"]
    return "\n\n".join(blocks)


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, "benchmarks.md", abs_src_path=str(ROOT / "benchmarks" / "README.md")))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = API.sub(_api, markdown)
    if MARKER.search(markdown):
        schema = _schema()

        def table(match):
            cls = getattr(schema, match.group(1), None)
            if not dataclasses.is_dataclass(cls):
                raise ValueError(f"{page.file.src_path}: no config class {match.group(1)} in {schema.__name__}")
            return _tables(cls)

        markdown = MARKER.sub(table, markdown)
    return markdown.replace("<!-- shipped-configs -->", _shipped_configs())
