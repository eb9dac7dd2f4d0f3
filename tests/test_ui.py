"""The approvals page in a real headless Chromium (Debian's), driven by Playwright.

A real tether in front of the fake OpenAI; the official openai SDK waits on a
held call in a background task while a person, in the browser, reads the call
and approves or denies it. No part of tether is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam, ChatCompletionToolParam
from playwright.async_api import BrowserContext, Dialog, Locator, Page, async_playwright, expect
from yarl import URL

from tests.conftest import MakeStack, Stack
from tests.fakes import Call, Reply
from tests.test_e2e_openai import MESSAGES, collect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TOKEN = "ui-test-token"
POLICY = """
rules:
  - id: resizes-held
    match: {tool: "resize_*"}
    action: hold
    timeout: 60s
    message: Resizing a volume needs a human
approvals: {keepalive: 200ms}
"""
ARGS = '{"volume_id": "vol-7", "size_gb": 500}'
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "resize_volume", "parameters": {"type": "object"}}}]
WAIT_MS = 10_000
# Kept by the test run (git-ignored), so a person can look at what an approver sees.
SCREENSHOT = Path(__file__).parent / "artifacts" / "approvals-page.png"


@pytest.fixture
async def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BrowserContext]:
    """Debian's chromium with a fresh profile; Playwright never downloads a browser of its own."""
    monkeypatch.setenv("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (`make system-deps` does it)")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True)
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def stack(make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv("TETHER_ADMIN_TOKEN", TOKEN)
    made = await make_stack(policy=POLICY)
    yield made
    # A test that failed half-way leaves a request waiting: end it now, not in 60 s.
    for approval in await made.tether.holds.queue.pending():
        await made.tether.holds.queue.decide(approval.id, approve=False, by="teardown")


async def hold(stack: Stack, call: Call, *, tools: list[ChatCompletionToolParam] = TOOLS,
               user: str = "session-1", headers: dict[str, str] | None = None,
               messages: list[ChatCompletionMessageParam] = MESSAGES, said: str | None = None
               ) -> asyncio.Task[ChatCompletion]:
    """The SDK's request, waiting in tether until the approval it opened is decided.
    `said`: the model's text beside the call."""
    stack.fake.push(Reply(content=said, calls=(call,)))
    client = stack.client(default_headers=headers or {})
    task = asyncio.create_task(client.chat.completions.create(
        model="gpt-x", messages=messages, tools=tools, user=user))
    for _ in range(500):
        if await stack.tether.holds.queue.pending() or task.done():
            break
        await asyncio.sleep(0.02)
    assert await stack.tether.holds.queue.pending(), "tether opened no approval"
    assert not task.done()
    return task


async def open_page(browser: BrowserContext, stack: Stack, name: str, token: str = TOKEN) -> Page:
    page = await browser.new_page()
    await page.goto(stack.admin_url + "/ui/")
    await page.get_by_label("Deciding as").fill(name)
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Connect").click()
    return page


def recent_row(page: Page) -> Locator:
    return page.locator("#recent tr").first


async def test_approve_in_the_page_releases_the_original_call(stack: Stack,
                                                              browser: BrowserContext) -> None:
    task = await hold(stack, Call("resize_volume", ARGS))
    page = await open_page(browser, stack, "alice")
    card = page.locator("article.approval")
    await expect(card).to_have_count(1, timeout=WAIT_MS)
    await expect(card.locator("h3")).to_have_text("resize_volume")
    # the canonical arguments, exactly the text the approval is bound to
    await expect(card.locator("pre.arguments")).to_have_text('{"size_gb":500,"volume_id":"vol-7"}')
    await expect(card.locator('[data-f="rules"]')).to_have_text("resizes-held")
    await expect(card.locator('[data-f="message"]')).to_have_text("Resizing a volume needs a human")
    await expect(card.locator('[data-f="waiting"]')).to_contain_text("(then denied); waiting since")
    await expect(page).to_have_title("(1) tether · approvals")
    assert not task.done()

    await card.get_by_role("button", name="Approve").click()
    result = await asyncio.wait_for(task, 10)
    [call] = result.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("resize_volume", ARGS)
    assert result.choices[0].finish_reason == "tool_calls"

    await expect(card).to_have_count(0, timeout=WAIT_MS)
    await expect(page.locator("#none")).to_be_visible()
    await expect(recent_row(page).locator("td.state")).to_have_text("approved")
    await expect(recent_row(page).locator("td.by")).to_have_text("alice")
    events = [(r["event"], r.get("decided_by")) for r in stack.audit() if r["kind"] == "approval"]
    assert events == [("created", None), ("approved", "alice")]
    # the token lives in this tab's sessionStorage, never in the URL or localStorage
    assert await page.evaluate("sessionStorage.getItem('tether-admin-token')") == TOKEN
    assert await page.evaluate("localStorage.getItem('tether-admin-token')") is None
    assert TOKEN not in page.url


async def test_deny_in_the_page_gives_the_agent_the_reason(stack: Stack,
                                                           browser: BrowserContext) -> None:
    stack.fake.push(Reply(content="Resizing.", calls=(Call("resize_volume", ARGS),)))
    stream = asyncio.create_task(stack.client().chat.completions.create(
        model="gpt-x", messages=MESSAGES, tools=TOOLS, stream=True))
    page = await open_page(browser, stack, "bob")
    card = page.locator("article.approval")
    await expect(card).to_have_count(1, timeout=WAIT_MS)
    await card.get_by_role("button", name="Deny…").click()
    await card.get_by_placeholder("reason").fill("not on a Friday")
    await card.get_by_role("button", name="Deny", exact=True).click()

    text, calls, finishes = await asyncio.wait_for(collect(await stream), 10)
    assert calls == {}
    assert text.startswith("Resizing.")
    assert "denied by bob" in text and "not on a Friday" in text
    assert finishes == ["stop"]
    await expect(card).to_have_count(0, timeout=WAIT_MS)
    await expect(recent_row(page).locator("td.state")).to_have_text("denied")
    await expect(recent_row(page).locator("td.reason")).to_have_text("not on a Friday")
    [decided] = [r for r in stack.audit() if r["kind"] == "approval" and r["event"] == "denied"]
    assert (decided["decided_by"], decided["reason"]) == ("bob", "not on a Friday")


async def test_model_supplied_text_is_inert_and_hidden_characters_are_shown(
        stack: Stack, browser: BrowserContext) -> None:
    tool = "resize_<img src=x onerror=alert(3)>"
    args = {"note": "<img src=x onerror=alert(1)>", "file": "report\u202egnp.exe",
            "zw": "a\u200bb"}
    task = await hold(
        stack, Call(tool, json.dumps(args)), user="sess<script>alert(2)</script>",
        headers={"X-Tether-Agent": '<b onmouseover="alert(4)">agent</b>'},
        tools=[{"type": "function", "function": {"name": tool, "parameters": {"type": "object"}}}])
    page = await open_page(browser, stack, "carol")
    dialogs: list[Dialog] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog))
    card = page.locator("article.approval")
    await expect(card).to_have_count(1, timeout=WAIT_MS)
    await page.wait_for_timeout(2500)     # a poll more, and time for any injected handler to run

    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    shown = canonical.replace("\u202e", "\\u202e").replace("\u200b", "\\u200b")
    await expect(card.locator("pre.arguments")).to_have_text(shown)
    await expect(card.locator("h3")).to_have_text(tool)
    await expect(card.locator('[data-f="session"]')).to_have_text("sess<script>alert(2)</script>")
    await expect(card.locator('[data-f="agent"]')).to_have_text('<b onmouseover="alert(4)">agent</b>')
    marks = card.locator("pre.arguments .hidden-char")
    await expect(marks).to_have_text(["\\u202e", "\\u200b"])
    await expect(marks.first).to_have_attribute("title", "invisible character U+202E")
    assert dialogs == []
    assert await page.locator("img").count() == 0
    assert await page.locator("b").count() == 0
    assert await page.locator("script").count() == 1          # the page's own
    body = await page.locator("body").inner_text()
    assert "\u202e" not in body and "\u200b" not in body

    await card.get_by_role("button", name="Deny…").click()
    await card.get_by_role("button", name="Deny", exact=True).click()
    result = await asyncio.wait_for(task, 10)
    assert result.choices[0].message.tool_calls is None
    assert "denied by carol" in (result.choices[0].message.content or "")
    assert dialogs == []


async def test_a_refused_token_is_asked_for_again(stack: Stack, browser: BrowserContext) -> None:
    task = await hold(stack, Call("resize_volume", ARGS))
    page = await open_page(browser, stack, "dave", token="wrong")
    await expect(page.get_by_role("alert")).to_contain_text("refused", timeout=WAIT_MS)
    await expect(page.get_by_label("Admin token")).to_be_visible()
    await expect(page.locator("main")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('tether-admin-token')") is None

    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("article.approval")).to_have_count(1, timeout=WAIT_MS)
    await expect(page.get_by_role("alert")).to_be_hidden()
    # a reload keeps the token (same tab), so no second prompt
    await page.reload()
    await expect(page.locator("article.approval")).to_have_count(1, timeout=WAIT_MS)
    await expect(page.get_by_label("Admin token")).to_be_hidden()
    await page.locator("article.approval").get_by_role("button", name="Approve").click()
    await asyncio.wait_for(task, 10)


async def test_a_call_already_decided_elsewhere_says_so(stack: Stack,
                                                        browser: BrowserContext) -> None:
    task = await hold(stack, Call("resize_volume", ARGS))
    [approval] = await stack.tether.holds.queue.pending()
    page = await browser.new_page()
    await page.clock.install()
    await page.goto(stack.admin_url + "/ui/")
    # Timers stop here, so no poll removes the card before the click; the first fetch
    # comes from the Connect button, not from a timer.
    await page.clock.pause_at(time.time() + 1)
    await page.get_by_label("Deciding as").fill("erin")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Connect").click()
    card = page.locator("article.approval")
    await expect(card).to_have_count(1, timeout=WAIT_MS)

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.admin_url}/v1/approvals/{approval.id}/deny",
                             json={"by": "frank", "reason": "no"},
                             headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
    await card.get_by_role("button", name="Approve").click()
    await expect(page.get_by_role("alert")).to_have_text(
        f"Already decided: approval {approval.id} is already denied by frank. Nothing was changed.")
    result = await asyncio.wait_for(task, 10)
    assert result.choices[0].message.tool_calls is None
    events = [(r["event"], r.get("decided_by")) for r in stack.audit() if r["kind"] == "approval"]
    assert events == [("created", None), ("denied", "frank")]


async def test_a_name_is_required_before_deciding(stack: Stack, browser: BrowserContext) -> None:
    task = await hold(stack, Call("resize_volume", ARGS))
    page = await open_page(browser, stack, "")
    card = page.locator("article.approval")
    await expect(card).to_have_count(1, timeout=WAIT_MS)
    await card.get_by_role("button", name="Approve").click()
    await expect(page.get_by_role("alert")).to_contain_text("Enter your name")
    await page.wait_for_timeout(300)
    assert await stack.tether.holds.queue.pending() and not task.done()
    await page.get_by_label("Deciding as").fill("gina")
    await card.get_by_role("button", name="Approve").click()
    await asyncio.wait_for(task, 10)
    assert (await stack.tether.holds.queue.recent())[0].decided_by == "gina"


async def test_without_an_admin_token_configured_the_page_says_so(
        stack: Stack, browser: BrowserContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_ADMIN_TOKEN")
    page = await open_page(browser, stack, "hal", token="anything")
    await expect(page.get_by_role("alert")).to_have_text(
        "the admin API is disabled: set TETHER_ADMIN_TOKEN", timeout=WAIT_MS)


async def test_only_the_static_page_is_served_without_the_token(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.admin_url + "/ui/") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
            assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert "<title>tether · approvals</title>" in await resp.text()
        async with http.get(stack.admin_url + "/ui", allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (308, "ui/")
        for path in ("/v1/approvals", "/ui/x", "/ui/%2e%2e/v1/approvals", "/ui/../v1/approvals",
                     "/ui//", "/UI/"):
            async with http.get(URL(stack.admin_url + path, encoded=True)) as resp:
                assert resp.status == 401, path
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.proxy_url + "/ui/") as resp:
            assert resp.status == 404          # never on the agents' port


HOSTILE_REQUEST = ("<script>alert('x')</script><img src=x onerror=alert(5)> please resize "
                   "report\u202egnp.exe, zero\u200bwidth, \u2066isolated\u2069, tag\U000e0041 "
                   + "A" * 100_000)


async def test_the_card_shows_what_an_approver_decides_on(stack: Stack,
                                                          browser: BrowserContext) -> None:
    """Beside the call: agent and session, effect and operation, rule and message, the
    user's request and the model's text (escaped, bounded), the session's recent holds,
    the time left. A screenshot of it is kept by the run."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": HOSTILE_REQUEST}]
    janitor = {"X-Tether-Agent": "janitor"}
    first = await hold(stack, Call("resize_volume", ARGS), messages=messages, headers=janitor)
    [earlier] = await stack.tether.holds.queue.pending()
    await stack.tether.holds.queue.decide(earlier.id, approve=False, by="carol",
                                          reason="too big")
    await asyncio.wait_for(first, 10)
    task = await hold(stack, Call("resize_volume", '{"volume_id": "vol-8", "size_gb": 50}'),
                      messages=messages, headers=janitor,
                      said="I will resize <b onclick=alert(6)>vol-8</b> now \u202eko ,")
    page = await open_page(browser, stack, "ivy")
    dialogs: list[Dialog] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog))
    card = page.locator("article.approval")
    await expect(card).to_have_count(1, timeout=WAIT_MS)
    field = card.locator
    await expect(field('[data-f="effect"]')).to_have_text("write")
    await expect(field('[data-f="api"]')).to_have_text(
        "none (no API operation is linked to this tool)")
    await expect(field('[data-f="rules"]')).to_have_text("resizes-held")
    await expect(field('[data-f="message"]')).to_have_text("Resizing a volume needs a human")
    await expect(field('[data-f="waiting"]')).to_have_text(
        re.compile(r"^[1-6]?\d s \(then denied\); waiting since "))   # of the 60 s timeout
    request = field('[data-f="user_request"]')
    await expect(request).to_contain_text(
        "<script>alert('x')</script><img src=x onerror=alert(5)> please resize "
        "report\\u202egnp.exe, zero\\u200bwidth, \\u2066isolated\\u2069, tag\\U000e0041 AAA")
    await expect(request).to_contain_text("more characters not shown)")
    assert len(await request.inner_text()) < 2200          # 100 KB in, bounded out
    await expect(field('[data-f="model_text"]')).to_have_text(
        "I will resize <b onclick=alert(6)>vol-8</b> now \\u202eko ,")
    await expect(field('[data-f="recent"] li')).to_have_count(1)
    await expect(field('[data-f="recent"] li')).to_contain_text(
        "held resize_volume: denied by carol")
    await card.scroll_into_view_if_needed()
    await page.wait_for_timeout(2500)     # a poll more, and time for any injected handler
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"approvals page screenshot: {SCREENSHOT}")
    assert dialogs == []
    assert await page.locator("img").count() == 0
    assert await page.locator("b").count() == 0
    assert await page.locator("script").count() == 1      # the page's own
    body = await page.locator("body").inner_text()
    for hidden in ("\u202e", "\u200b", "\u2066", "\U000e0041"):
        assert hidden not in body

    await card.get_by_role("button", name="Approve").click()
    result = await asyncio.wait_for(task, 10)
    [call] = result.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "resize_volume"
    [created] = [r for r in stack.audit() if r["kind"] == "approval"
                 and r["event"] == "created" and r["id"] != earlier.id]
    assert created["context"]["effect"] == "write"     # the audit keeps what was shown
    assert len(created["context"]["user_request"]) < 2100
