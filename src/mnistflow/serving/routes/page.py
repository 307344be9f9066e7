"""GET /: the draw-a-digit page, and its script and styles under /static."""

from __future__ import annotations

import functools
import importlib.resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

PACKAGE = "mnistflow.serving"  # holds static/: the page, its script and its styles

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(_page())


def static_files() -> StaticFiles:
    """The app to mount at /static (a mount, so not part of the router)."""
    return StaticFiles(packages=[(PACKAGE, "static")])


@functools.cache
def _page() -> str:
    return importlib.resources.files(PACKAGE).joinpath("static/index.html").read_text()
