"""The dashboard's files (services/wms/http/ui.py): served at ``/`` and ``/ui/`` without a token,
with their content types, caching and a strict Content-Security-Policy; every file the page loads
exists; a path that tries to leave the directory is refused, naming the field; no script of ours
builds markup from strings."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
import yarl

from services.wms import RunningWms
from services.wms.http import ui

STATIC = Path(ui.__file__).parent / ui.STATIC_DIR
OWN_SCRIPTS = sorted((STATIC / "js").glob("*.js"))
HTML_SINKS = [
    re.compile(pattern)
    for pattern in (
        r"\.(?:inner|outer)HTML\b",
        r"\binsertAdjacentHTML\s*\(",
        r"\bdocument\.write(?:ln)?\s*\(",
        r"\bcreateContextualFragment\s*\(",
        r"\bsetHTML(?:Unsafe)?\s*\(",
        r"\beval\s*\(",
        r"\bnew\s+Function\s*\(",
    )
]


def csp_directives(response: aiohttp.ClientResponse) -> dict[str, str]:
    policy = response.headers["Content-Security-Policy"]
    directives = (part.strip().split(None, 1) for part in policy.split(";") if part.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def assert_locked_down(response: aiohttp.ClientResponse) -> None:
    directives = csp_directives(response)
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert "unsafe" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_root_serves_the_page_without_a_token(http: aiohttp.ClientSession) -> None:
    async with http.get("/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert_locked_down(resp)
        page = await resp.text()
    assert '<script type="module" src="/ui/js/main.js">' in page


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ui/js/main.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
        ("/ui/vendor/uplot-1.6.32/LICENSE", "text/plain; charset=utf-8"),
    ],
)
async def test_files_have_their_content_type_and_the_policy(
    http: aiohttp.ClientSession, path: str, content_type: str
) -> None:
    async with http.get(path) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == content_type
        assert_locked_down(resp)


async def test_vendored_files_are_cached_for_good_and_ours_revalidated(
    http: aiohttp.ClientSession,
) -> None:
    async with http.get("/ui/vendor/uplot-1.6.32/uPlot.iife.min.js") as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == ui.CACHE_IMMUTABLE
        assert "v1.6.32" in (await resp.text())[:100]
    async with http.get("/ui/js/sse.js") as resp:
        assert resp.headers["Cache-Control"] == "no-cache"


async def test_a_held_version_is_answered_304(http: aiohttp.ClientSession) -> None:
    async with http.get("/ui/style.css") as resp:
        etag = resp.headers["ETag"]
    async with http.get("/ui/style.css", headers={"If-None-Match": f'"other", {etag}'}) as resp:
        assert resp.status == 304
        assert_locked_down(resp)
    async with http.get("/ui/style.css", headers={"If-None-Match": '"other"'}) as resp:
        assert resp.status == 200


async def test_every_file_the_page_loads_is_served(http: aiohttp.ClientSession) -> None:
    """The page's scripts and style sheets, and every module those scripts import."""
    async with http.get("/") as resp:
        page = await resp.text()
    wanted = set(re.findall(r'(?:src|href)="(/ui/[^"]+)"', page))
    for script in OWN_SCRIPTS:
        for target in re.findall(r'from "\./([^"]+)"', script.read_text()):
            wanted.add(f"/ui/js/{target}")
    assert "/ui/vendor/uplot-1.6.32/uPlot.iife.min.js" in wanted
    assert "/ui/js/workflow_page.js" in wanted
    for path in sorted(wanted):
        async with http.get(path) as resp:
            assert resp.status == 200, path


async def test_every_file_of_the_directory_is_servable(wms: RunningWms) -> None:
    """A file of a type ui.py does not know would be silently left out of the dashboard."""
    on_disk = {
        path.relative_to(STATIC).as_posix()
        for path in STATIC.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.parts)
    }
    assert set(ui.load_files(STATIC)) == on_disk


@pytest.mark.parametrize(
    "raw_path",
    [
        "/ui/../server.py",
        "/ui/js/../../ui.py",
        "/ui/%2e%2e/ui.py",
        "/ui/js/..%2f..%2fui.py",
        "/ui/js/%5c..%5cui.py",
        "/ui/js//main.js",
        "/ui/",
    ],
)
async def test_a_path_leaving_the_directory_is_refused_naming_the_field(
    wms: RunningWms, raw_path: str
) -> None:
    # Sent as written: no client-side normalisation of the dots.
    url = yarl.URL(wms.http_url + raw_path, encoded=True)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 400, raw_path
        assert_locked_down(resp)
        body = await resp.json()
    assert body["code"] == 3
    [detail] = body["details"]
    assert [v["field"] for v in detail["field_violations"]] == ["path"]


async def test_a_missing_file_is_404_not_found(http: aiohttp.ClientSession) -> None:
    async with http.get("/ui/js/nothing.js") as resp:
        assert resp.status == 404
        assert_locked_down(resp)
        body = await resp.json()
    assert body["code"] == 5
    assert "/ui/js/nothing.js" in body["message"]


@pytest.mark.parametrize("script", OWN_SCRIPTS, ids=lambda p: p.name)
def test_no_script_builds_markup_from_strings(script: Path) -> None:
    """Server data (stderr, payloads, ids) only ever becomes text: no HTML parsing sinks, no eval
    (the policy would refuse eval anyway)."""
    source = script.read_text()
    for sink in HTML_SINKS:
        assert not sink.search(source), f"{script.name} uses {sink.pattern}"
