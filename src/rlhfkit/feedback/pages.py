"""Server-rendered pages: the Jinja2 environment (autoescape always on: completions may hold HTML or script)
and Markdown guidelines rendered with raw HTML disabled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader
from markdown_it import MarkdownIt
from markupsafe import Markup

from rlhfkit.feedback.auth import Principal

_markdown = MarkdownIt("commonmark", {"html": False})  # raw HTML in guidelines is shown as text, not run
_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
_env.filters["markdown"] = lambda text: Markup(_markdown.render(text or ""))  # noqa: S704 - html is off above
_env.filters["pct"] = lambda x: "–" if x is None else f"{100 * x:.1f}%"
_env.filters["num"] = lambda x, digits=3: "–" if x is None else f"{x:.{digits}f}"
_env.filters["when"] = lambda t, default="–": default if t is None else f"{t:%Y-%m-%d %H:%M} UTC"


def render(request: Request, template: str, principal: Principal | None, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(request=request, me=principal, **context)
    return HTMLResponse(html, status_code=status_code)
