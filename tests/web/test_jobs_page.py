"""The jobs page and the API docs in real headless Chromium, against a real server in embedded mode.

Every page runs with the network cut to anything but the server (requests elsewhere are aborted and
recorded), and every Content-Security-Policy violation or script error fails the test. The page is driven as a
person would: the submit form, the rows, the Cancel and Delete buttons, the download links, the key prompt.

`UPDATE_SCREENSHOTS=1` also writes docs/jobs-page.png (a merge running, with other jobs listed) and
docs/jobs-page-detail.png (one job's details), the README's pictures.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, expect

from adapter_merge.service.routes.pages import PAGE_POLICY, REDOC_POLICY
from tests.loopback import wait_for
from tests.service.harness import FINISHED, REPO, Api, service_env, serving
from tests.web.conftest import WebModels

SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1280, "height": 800}
ROW_STATE = """id => {
  const row = document.querySelector(`tr[data-job="${id}"]`);
  if (!row) return null;
  const bar = row.querySelector("progress");
  return {status: row.querySelector(".badge").textContent, value: bar.hasAttribute("value") ? bar.value : null,
          percent: row.querySelector(".percent").textContent, eta: row.querySelector(".eta")?.textContent ?? null};
}"""
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
"""ReDoc's footer shows Redocly's logo from their CDN; the policy blocks it (the footer keeps its text)."""


@dataclass
class Watched:
    """What a page did besides talking to the server: requests elsewhere, blocked content, script errors."""

    page: Page
    elsewhere: list[str] = field(default_factory=list)
    csp_blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def check(self, allowed_csp: tuple[str, ...] = (), allowed_errors: str | None = None) -> None:
        assert self.elsewhere == [], "requests left for other hosts"
        assert [text for text in self.csp_blocked if not any(url in text for url in allowed_csp)] == []
        assert [text for text in self.errors if not (allowed_errors and re.search(allowed_errors, text))] == []


def watch(browser: Browser) -> Watched:
    context = browser.new_context(viewport=VIEWPORT, locale="en-GB", timezone_id="UTC", accept_downloads=True)
    page = context.new_page()
    watched = Watched(page)

    def route(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            watched.elsewhere.append(route.request.url)
            route.abort()

    def console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            watched.csp_blocked.append(message.text)
        elif message.type == "error":
            watched.errors.append(message.text)

    context.route("**/*", route)
    page.on("console", console)
    page.on("pageerror", lambda error: watched.errors.append(f"page error: {error}"))
    return watched


@pytest.fixture(scope="module")
def server(web_models: WebModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One embedded server (authentication off, one worker) for the module's tests, in order."""
    data = tmp_path_factory.mktemp("web-data")
    with serving(service_env(data, web_models.root), data / "server.log") as (_, api):
        yield api


@pytest.fixture
def page(browser: Browser, server: Api) -> Iterator[Watched]:
    watched = watch(browser)
    yield watched
    watched.page.context.close()


def row_state(page: Page, job_id: str) -> dict[str, Any] | None:
    return page.evaluate(ROW_STATE, job_id)


def follow(page: Page, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90) -> list[dict]:
    """The row's states as the page showed them, each change once, until `until` holds."""
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        state = row_state(page, job_id)
        if state is None:
            return False
        if not seen or seen[-1] != state:
            seen.append(state)
        if until(state):
            return True
        if state["status"] in FINISHED:
            raise AssertionError(f"row {job_id} ended without reaching the awaited state; seen {seen[-5:]}")
        return False

    wait_for(reached, timeout, lambda: f"row {job_id} in the awaited state; seen {seen[-5:]}")
    return seen


def submit_through_form(page: Page, base: str, adapters: str, dtype: str = "auto") -> str:
    """Fill in and send the New merge form; the job id, from the link the form shows."""
    if page.locator("#new-merge[open]").count() == 0:
        page.click("#new-merge summary")
    page.fill("input[name=base_model]", base)
    page.fill("textarea[name=adapters]", adapters)
    page.select_option("select[name=output_dtype]", dtype)
    page.click("#submit-form button[type=submit]")
    link = page.locator("#submit-status a")
    expect(link).to_be_visible(timeout=30_000)
    return (link.get_attribute("href") or "").removeprefix("#job=")


def download_artifact(page: Page, job_id: str, path: str) -> bytes:
    """Open the job's details and click the artifact's link; the bytes the browser saved."""
    details = page.locator("tr.detail-row")
    if details.count() == 0:
        page.click(f"tr[data-job='{job_id}'] td.id")
    with page.expect_download() as download:
        details.get_by_role("link", name=path, exact=True).click()
    return Path(download.value.path()).read_bytes()


def screenshot(page: Page, name: str) -> None:
    """docs/<name>: the page from its top bar to the end of the jobs list (not the empty space below)."""
    box = page.locator("#jobs-card").bounding_box()
    assert box is not None
    page.screenshot(path=REPO / "docs" / name, full_page=True,
                    clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": box["y"] + box["height"] + 28})


def largest_weights(job: dict[str, Any]) -> dict[str, Any]:
    return max((item for item in job["artifacts"] if item["path"].endswith(".safetensors")), key=lambda a: a["size"])


def test_a_merge_submitted_in_the_form_runs_to_its_artifacts(page: Watched, server: Api, web_models: WebModels) -> None:
    """Submitted through the form, the merge shows up, runs, and ends at 100% as succeeded; an artifact
    clicked in its details downloads the bytes the job lists (sha256)."""
    response = page.page.goto(server.base_url + "/")
    assert response is not None and response.headers["content-security-policy"] == PAGE_POLICY
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    expect(page.page.locator("#live")).to_contain_text("live")
    job_id = submit_through_form(page.page, "small/base", "small/lora\nsmall/dora 0.5")
    seen = follow(page.page, job_id, lambda state: state["status"] == "succeeded")
    assert seen[-1]["value"] == 100 and seen[-1]["percent"] == "100%", seen
    job = server.job(job_id)
    assert [adapter["weight"] for adapter in job["request"]["adapters"]] == [1.0, 0.5]
    artifact = largest_weights(job)
    assert hashlib.sha256(download_artifact(page.page, job_id, artifact["path"])).hexdigest() == artifact["sha256"]

    # The open job stays open, from GET /jobs/{id}, when the filter hides it from the list; its address says so.
    assert page.page.url.endswith(f"#job={job_id}")
    page.page.select_option("#filter", "failed")
    expect(page.page.locator(f"tr[data-job='{job_id}']")).to_have_count(0)
    expect(page.page.locator("#detail")).to_contain_text(job_id)
    expect(page.page.locator("#detail")).to_contain_text(artifact["sha256"])
    page.page.select_option("#filter", "")
    expect(page.page.locator("#detail")).to_be_hidden()
    expect(page.page.locator("tr.detail-row")).to_contain_text(artifact["sha256"])
    page.check()


def test_a_running_merge_moves_and_buttons_cancel_and_delete(page: Watched, server: Api, web_models: WebModels) -> None:
    """A slow merge's bar moves with an ETA while the next job waits; that queued job is cancelled with its
    button (it never starts) and deleted with its own; the slow merge ends at 100%. Then a running merge is
    cancelled with its button."""
    ui = page.page
    ui.goto(server.base_url + "/")
    slow = server.submit(web_models.slow)
    queued = server.submit({**web_models.small, "reuse": False})  # one worker, busy with the slow merge: this one waits
    moving = follow(ui, slow["id"], lambda state: 0 < (state["value"] or 0) < 100 and state["eta"] is not None)
    expect(ui.locator(f"tr[data-job='{queued['id']}'] .badge")).to_have_text("queued")
    if SCREENSHOTS:
        screenshot(ui, "jobs-page.png")

    ui.locator(f"tr[data-job='{queued['id']}']").get_by_role("button", name="Cancel").click()
    expect(ui.locator(f"tr[data-job='{queued['id']}'] .badge")).to_have_text("cancelled")
    seen = moving + follow(ui, slow["id"], lambda state: state["status"] == "succeeded")
    values = [state["value"] for state in seen if state["value"] is not None]
    assert values == sorted(values) and values[-1] == 100 and seen[-1]["percent"] == "100%", seen
    assert any(0 < value < 100 for value in values), seen
    assert server.job(queued["id"])["started_at"] is None  # cancelled while queued: never ran

    ui.once("dialog", lambda dialog: dialog.accept())
    ui.locator(f"tr[data-job='{queued['id']}']").get_by_role("button", name="Delete").click()
    expect(ui.locator(f"tr[data-job='{queued['id']}']")).to_have_count(0)
    assert server.http.get(f"/jobs/{queued['id']}").status_code == 404

    if SCREENSHOTS:
        ui.click(f"tr[data-job='{slow['id']}'] td.id")
        expect(ui.locator("tr.detail-row")).to_contain_text("merge_manifest.json")
        screenshot(ui, "jobs-page-detail.png")

    running = server.submit({**web_models.slow, "reuse": False})
    follow(ui, running["id"], lambda state: state["status"] == "running")
    ui.locator(f"tr[data-job='{running['id']}']").get_by_role("button", name="Cancel").click()
    follow(ui, running["id"], lambda state: state["status"] == "cancelled")
    page.check()


def test_api_docs_render_from_local_files(page: Watched, server: Api) -> None:
    """Swagger UI lists every operation and ReDoc every path and finds one by search, with nothing fetched
    from another host and nothing blocked by the pages' policies (ReDoc's footer logo aside)."""
    schema = server.http.get("/openapi.json").json()
    operations = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    ui = page.page
    response = ui.goto(server.base_url + "/docs")
    assert response is not None  # FastAPI's inline starter, allowed by its hash and no other inline script:
    assert re.search(r"; script-src 'self' 'sha256-[A-Za-z0-9+/]{43}='$", response.headers["content-security-policy"])
    expect(ui.locator(".opblock").first).to_be_visible(timeout=20_000)
    shown = {(block.locator(".opblock-summary-method").inner_text(),
              block.locator(".opblock-summary-path").get_attribute("data-path"))
             for block in ui.locator(".opblock").all()}
    assert shown == operations
    expect(ui.locator(".swagger-ui .btn.authorize")).to_be_visible()

    response = ui.goto(server.base_url + "/redoc")
    assert response is not None and response.headers["content-security-policy"] == REDOC_POLICY
    expect(ui.locator("h1")).to_contain_text("adapter-merge", timeout=20_000)
    for path in schema["paths"]:
        expect(ui.locator("[data-section-id^='operation/']").filter(has_text=path).first).to_be_attached()
    ui.fill("input[placeholder='Search...']", "cancel")  # ReDoc searches in a worker (the policy's blob:)
    expect(ui.locator("[data-role='search:results'] li")).to_have_count(1)
    expect(ui.locator("[data-role='search:results'] li")).to_have_attribute("aria-label", "Cancel Job")
    page.check(allowed_csp=(REDOC_LOGO,))


def test_with_api_keys_the_page_asks_for_one(browser: Browser, web_models: WebModels, tmp_path: Path) -> None:
    """With authentication on, the page asks for a key and says why one is refused; a read key lists but may
    not submit (403, shown); with a submit key a merge goes through and an artifact downloads with the key
    (the link alone would carry none). Every API request after sign-in carries the key."""
    keys = {"read-key-0123": ("team-a", "read"), "submit-key-4567": ("team-a", "submit")}
    entries = [{"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": tenant, "role": role}
               for key, (tenant, role) in keys.items()]
    (tmp_path / "keys.json").write_text(json.dumps({"keys": entries}))
    env = service_env(tmp_path / "data", web_models.root, MERGE_AUTH="required",
                      MERGE_API_KEYS_FILE=str(tmp_path / "keys.json"))
    with serving(env, tmp_path / "server.log") as (_, api):
        watched = watch(browser)
        ui = watched.page
        sent: list[tuple[str, str | None]] = []

        def record(request: Request) -> None:
            if re.match(r"/(jobs|merge)", urlsplit(request.url).path):
                sent.append((urlsplit(request.url).path, request.headers.get("authorization")))

        ui.on("request", record)
        try:
            ui.goto(api.base_url + "/")
            expect(ui.locator("#login")).to_be_visible()
            expect(ui.locator("#live")).to_have_text("sign-in needed")
            ui.fill("#token", "not-a-key")
            ui.click("#login button[type=submit]")
            expect(ui.locator("#login-reason")).to_contain_text("refused (401)")

            ui.fill("#token", "read-key-0123")
            ui.click("#login button[type=submit]")
            expect(ui.locator("#login")).to_be_hidden()
            expect(ui.locator("#empty")).to_be_visible()
            ui.click("#new-merge summary")
            ui.fill("input[name=base_model]", "small/base")
            ui.fill("textarea[name=adapters]", "small/lora")
            ui.click("#submit-form button[type=submit]")
            expect(ui.locator("#submit-status")).to_contain_text("(403): role 'read' may not do this")

            ui.click("#forget")
            expect(ui.locator("#login")).to_be_visible()
            ui.fill("#token", "submit-key-4567")
            ui.click("#login button[type=submit]")
            expect(ui.locator("#login")).to_be_hidden()
            sent.clear()
            job_id = submit_through_form(ui, "small/base", "small/lora")
            follow(ui, job_id, lambda state: state["status"] == "succeeded")
            api.http.headers["authorization"] = "Bearer submit-key-4567"
            artifact = largest_weights(api.job(job_id))
            assert hashlib.sha256(download_artifact(ui, job_id, artifact["path"])).hexdigest() == artifact["sha256"]
            assert ui.evaluate("sessionStorage.getItem('adapter-merge.token')") == "submit-key-4567"
            assert sent and {header for _, header in sent} == {"Bearer submit-key-4567"}, sent
            assert any(path.startswith(f"/jobs/{job_id}/artifacts/") for path, _ in sent)
            # Refused requests show up in the console as failed loads; nothing else may.
            watched.check(allowed_errors=r"status of (401|403)")
        finally:
            ui.context.close()
