"""`recsys config`: the resolved config as text, one line per field with its default and the
comment that documents it in sections.py (so the listing and the code cannot disagree)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize

from recsys.config import sections
from recsys.config.sections import Config


def listing(cfg: Config, source: str) -> str:
    """One line per field, grouped by section: name, value, default and the field's comment."""
    comments = _field_comments()
    default = Config()
    groups = [("", cfg, default)] + [(f.name, getattr(cfg, f.name), getattr(default, f.name))
                                     for f in dataclasses.fields(cfg)
                                     if dataclasses.is_dataclass(getattr(cfg, f.name))]
    rows = []  # (section, marker, name, value, default, comment)
    for section, obj, base in groups:
        for f in dataclasses.fields(obj):
            value, dflt = getattr(obj, f.name), getattr(base, f.name)
            if not dataclasses.is_dataclass(value):
                rows.append((section, "*" if value != dflt else " ", f.name, repr(value),
                             repr(dflt), comments.get((type(obj).__name__, f.name), "")))
    name_w = max(len(r[2]) for r in rows)
    value_w = min(max(len(r[3]) for r in rows), 24)
    dflt_w = min(max(len(r[4]) for r in rows), 24)
    lines = [f"# {source}: the resolved config; * marks a value that differs from the default"]
    for section in dict.fromkeys(r[0] for r in rows):
        if section:
            doc = (type(getattr(cfg, section)).__doc__ or "").strip().splitlines()[0]
            lines.append(f"\n[{section}]" + ("" if doc.startswith(type(getattr(cfg, section))
                                                                   .__name__) else f"  {doc}"))
        for _, mark, name, value, dflt, comment in (r for r in rows if r[0] == section):
            lines.append(f"{mark} {name:<{name_w}}  {value:<{value_w}}  default {dflt:<{dflt_w}}"
                         f"  {comment}".rstrip())
    return "\n".join(lines)


def _field_comments() -> dict[tuple[str, str], str]:
    """{(class, field): the field's comment in recsys/config/sections.py}: the comment on its line (with
    the comment lines below when it ends open), else the comment lines right above it."""
    source = inspect.getsource(sections)
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    alone = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    still_open = (lambda s: s.endswith((";", ":", ",")) or s.count("(") > s.count(")"))
    out = {}
    for cls in ast.parse(source).body:
        for stmt in cls.body if isinstance(cls, ast.ClassDef) else ():
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            n = stmt.end_lineno
            if n in comments and n not in alone:
                text = [comments[n]]
                while still_open(text[-1]) and n + 1 in alone:
                    n += 1
                    text.append(comments[n])
            else:
                text, n = [], stmt.lineno - 1
                while n in alone:
                    text.insert(0, comments[n])
                    n -= 1
            out[(cls.name, stmt.target.id)] = " ".join(text)
    return out
