"""Pages for people: the playground at `/` (and `/playground`), and the API documentation at `/docs` and `/redoc`.

Everything these pages load is served from here, so they work with no internet. The playground is plain
HTML, CSS and JavaScript in `service/pages/`; the Swagger UI and ReDoc bundles come from the
`fastapi-offline` package, which ships the current swagger-ui-dist and redoc releases as package data (the
older `swagger-ui-bundle` ships Swagger UI 4, which cannot render the OpenAPI 3.1 schema FastAPI writes).

The app must be built with `FastAPI(docs_url=None, redoc_url=None)`: FastAPI's own /docs and /redoc load
their scripts from a CDN and, registered first, would shadow these.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)

PAGES = Path(__file__).resolve().parents[2] / "pages"
VENDOR = Path(str(files("fastapi_offline") / "static"))
STATIC = "/static"

# Served by name only (never a path from the request), each with its media type.
_PLAYGROUND_FILES = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_VENDOR_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}
# The playground changes with the service, so browsers revalidate it (ETag); the vendored bundles change
# only with the package, and are large, so they are cached for a day.
_REVALIDATE = {"Cache-Control": "no-cache"}
_CACHE_A_DAY = {"Cache-Control": "public, max-age=86400"}
# What the pages may load: only this service. The browser then refuses anything else, should a bundle ever
# reach out (ReDoc's sidebar shows a logo from its vendor's CDN, with no option to turn it off: the image is
# blocked, and ReDoc hides it). The playground has no inline script or style; the documentation pages, as
# FastAPI writes them, start their bundle with an inline script, and the bundles set inline styles and start
# ReDoc's search in a blob: worker.
_PLAYGROUND_CSP = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
}
_DOCS_CSP = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
    "worker-src 'self' blob:; base-uri 'none'; frame-ancestors 'self'"
}


def _favicon(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{STATIC}/playground/favicon.svg"


@router.get("/", response_class=FileResponse)
@router.get("/playground", response_class=FileResponse)
async def playground() -> FileResponse:
    return FileResponse(
        PAGES / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**_REVALIDATE, **_PLAYGROUND_CSP},
    )


@router.get(STATIC + "/playground/{name}", response_class=FileResponse)
async def playground_asset(name: str) -> FileResponse:
    if name not in _PLAYGROUND_FILES:
        raise HTTPException(404, "Not Found")
    return FileResponse(PAGES / name, media_type=_PLAYGROUND_FILES[name], headers=_REVALIDATE)


@router.get(STATIC + "/docs/{name}", response_class=FileResponse)
async def docs_asset(name: str) -> FileResponse:
    if name not in _VENDOR_FILES:
        raise HTTPException(404, "Not Found")
    return FileResponse(VENDOR / name, media_type=_VENDOR_FILES[name], headers=_CACHE_A_DAY)


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    app, root = request.app, request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - API documentation",
        swagger_js_url=f"{root}{STATIC}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC}/docs/swagger-ui.css",
        swagger_favicon_url=_favicon(request),
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        # Swagger UI otherwise loads a badge image from validator.swagger.io for any spec not on localhost.
        swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
    )
    page.headers.update(_DOCS_CSP)
    return page


@router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    page = get_swagger_ui_oauth2_redirect_html()
    page.headers.update(_DOCS_CSP)
    return page


@router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    app, root = request.app, request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - API reference",
        redoc_js_url=f"{root}{STATIC}/docs/redoc.standalone.js",
        redoc_favicon_url=_favicon(request),
        with_google_fonts=False,
    )
    page.headers.update(_DOCS_CSP)
    return page
