"""The web console in a real browser (Debian's chromium, driven by Playwright) against a real
server running the real engine: a tenant logs in, watches batches submitted with the SDKs
appear and finish without reloading the page, opens one, downloads its output, cancels
another; an admin sees the engines and every tenant's batches. Screenshots of each step go
to ``test-artifacts/console/`` at the repository root."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.helpers import chat_line, create_message_batch, jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server

ALICE_KEY, OPS_KEY = "console-alice-key-01", "console-ops-admin-key-01"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Records each text a batch's status cell shows in the list, every 50 ms, in the page itself.
WATCH_STATUS = """id => {
    window.__seen = [];
    setInterval(() => {
        const cell = document.querySelector(`#batches-table tr[data-batch-id="${id}"] .status`);
        const text = cell && cell.textContent;
        if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
    }, 50);
}"""
SLOW = 120_000  # ms: a batch on the real engine, on a small machine
QUICK = 15_000  # ms: anything the page shows after one poll


def chromium_path() -> str:
    """Debian's chromium; the test is skipped, loudly, where it or Playwright is missing."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip(
            "PLAYWRIGHT NOT INSTALLED: the console browser test did not run; "
            "pip install 'playwright>=1.49' (the test extra lists it)"
        )
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        pytest.skip(
            "CHROMIUM NOT INSTALLED: the console browser test did not run; "
            "install Debian's chromium package"
        )
    return found


@pytest.fixture(scope="module")
def browser_path() -> str:
    return chromium_path()


@pytest.fixture(scope="module")
def console_server(
    browser_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("console")
    keys = data_dir.parent / f"{data_dir.name}-keys.txt"
    keys.write_text(f"{ALICE_KEY} alice\n{OPS_KEY} ops admin\n")
    with running_server(data_dir, BATCHD_KEYS_FILE=str(keys)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(browser_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=browser_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


class Console:
    """A browser tab on the console, recording what could leak the key or break the page."""

    def __init__(self, browser: Any, server: ServerProcess) -> None:
        self.server = server
        self.context = browser.new_context(
            accept_downloads=True, viewport={"width": 1400, "height": 900}
        )
        # Anything the page's CSP blocks (an inline style, say) is recorded in the page.
        self.context.add_init_script(
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation',"
            " e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(QUICK)
        self.requested: list[str] = []
        self.visited: list[str] = []
        self.problems: list[str] = []
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("framenavigated", lambda f: self.visited.append(f.url))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on(
            "console",
            lambda m: (
                self.problems.append(f"console: {m.text}")
                if "Content Security Policy" in m.text or "violates" in m.text
                else None
            ),
        )

    def open(self) -> None:
        response = self.page.goto(f"{self.server.url}/console")
        assert response is not None and response.status == 200
        assert "default-src 'none'" in response.headers["content-security-policy"]

    def login(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#login")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def assert_key_kept_in_session_storage_only(self, key: str) -> None:
        page = self.page
        assert page.evaluate("sessionStorage.getItem('batchd.console.key')") == key
        assert key not in page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
        assert key not in page.evaluate("document.cookie")
        assert self.context.cookies() == []
        for url in [page.url, *self.requested, *self.visited]:
            assert key not in url, url

    def close(self) -> None:
        assert self.page.evaluate("window.__cspViolations") == []
        assert self.problems == [], self.problems
        self.context.close()


def sdk(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def submit_lines(api: openai.OpenAI, name: str, lines: list[dict[str, Any]] | bytes) -> str:
    file_id = upload(api, lines, name=f"{name}.jsonl")
    return api.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def submit(api: openai.OpenAI, prefix: str, count: int, max_tokens: int) -> str:
    lines = [
        chat_line(f"{prefix}-{i}", f"Count from {i} to {i + 20}.", max_tokens=max_tokens)
        for i in range(count)
    ]
    return submit_lines(api, prefix, lines)


def test_a_wrong_key_shows_an_error_and_the_login_form_again(
    browser: Any, console_server: ServerProcess
) -> None:
    from playwright.sync_api import expect

    console = Console(browser, console_server)
    console.open()
    expect(console.page.locator("#login")).to_be_visible()
    console.shot("01-login.png")
    console.login("not-a-key-of-anyone")
    expect(console.page.locator("#error")).to_contain_text("Incorrect API key")
    expect(console.page.locator("#login")).to_be_visible()
    expect(console.page.locator("#batches-table")).to_have_count(0)
    assert console.page.evaluate("sessionStorage.length") == 0
    console.shot("01b-wrong-key.png")
    # A key that stops working mid-session (revoked, say): the login form again, saying why.
    console.page.evaluate("sessionStorage.setItem('batchd.console.key', 'revoked-key-0001')")
    console.page.reload()
    expect(console.page.locator("#error")).to_contain_text("Log in again")
    expect(console.page.locator("#login")).to_be_visible()
    assert console.page.evaluate("sessionStorage.length") == 0
    console.close()


def test_console_follows_batches_downloads_cancels_and_shows_admins_the_engines(
    browser: Any, console_server: ServerProcess
) -> None:
    from playwright.sync_api import expect

    alice = sdk(console_server, ALICE_KEY)
    console = Console(browser, console_server)
    page = console.page
    console.open()
    console.login(ALICE_KEY)
    expect(page.locator("#logout")).to_be_visible()
    expect(page.locator("#batches-table")).to_be_visible()
    expect(page.locator("#nav-engines")).to_be_hidden()  # alice is no admin
    expect(page.locator("#all-tenants")).to_have_count(0)
    page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads

    # A small batch: it appears in the list and finishes there, the page never reloading.
    small = submit(alice, "small", 4, max_tokens=32)
    assert page.locator(f'tr[data-batch-id="{small}"]').count() == 0  # not yet polled
    page.evaluate(WATCH_STATUS, small)
    status_cell = page.locator(f'#batches-table tr[data-batch-id="{small}"] .status')
    expect(status_cell).to_have_text(
        re.compile("validating|in_progress|finalizing|completed"), timeout=QUICK
    )
    console.shot("02-batches-list.png")
    expect(status_cell).to_have_text("completed", timeout=SLOW)
    row = page.locator(f'#batches-table tr[data-batch-id="{small}"]')
    expect(row).to_contain_text("4/4")
    expect(row.locator("td.surface")).to_have_text("openai")
    assert page.evaluate("window.__sameDocument") is True, "the list reloaded the page"
    seen = page.evaluate("window.__seen")
    print(f"the small batch's status cell showed {seen}")
    assert seen[0] in ("validating", "in_progress", "finalizing", "completed")
    assert seen[-1] == "completed"

    # An Anthropic batch of the same tenant shows in the same list; so do a batch whose
    # requests partly fail and one whose input does not validate.
    message_batch = create_message_batch(console_server.url, "m-0", key=ALICE_KEY)
    mixed = submit_lines(
        alice,
        "mixed",
        [
            chat_line("fine", "Say hi."),
            chat_line("too-long", "word " * 3000),
            chat_line("no-model", "Say hi.", model="no-such-model"),
        ],
    )
    invalid = submit_lines(alice, "invalid", jsonl([chat_line("good", "Hi.")]) + b"not json\n")
    message_row = page.locator(f'#batches-table tr[data-batch-id="{message_batch}"]')
    expect(message_row.locator("td.surface")).to_have_text("anthropic", timeout=QUICK)
    expect(message_row.locator(".status")).to_have_text("completed", timeout=SLOW)
    mixed_row = page.locator(f'#batches-table tr[data-batch-id="{mixed}"]')
    invalid_row = page.locator(f'#batches-table tr[data-batch-id="{invalid}"]')
    expect(mixed_row.locator(".status")).to_have_text("completed", timeout=SLOW)
    expect(invalid_row.locator(".status")).to_have_text("failed", timeout=SLOW)
    assert page.evaluate("window.__sameDocument") is True

    # The status filter keeps only what it names.
    page.select_option("#status-filter", "cancelled")
    expect(page.locator("#batches-table tbody tr")).to_have_count(0)
    page.select_option("#status-filter", "completed")
    expect(row).to_be_visible()
    expect(invalid_row).to_have_count(0)
    page.select_option("#status-filter", "failed")
    expect(invalid_row).to_be_visible()
    expect(page.locator("#batches-table tbody tr")).to_have_count(1)
    page.select_option("#status-filter", "")

    # Its page: counts, usage, cost, timeline; the output downloads as the SDK wrote it.
    row.locator("td.id a").click()
    assert page.url.endswith(f"#/batch/{small}")
    expect(page.locator("#batch-status")).to_have_text("completed")
    expect(page.locator('#batch-counts tr[data-count="succeeded"] td.num')).to_have_text("4")
    expect(page.locator('#batch-counts tr[data-count="total"] td.num')).to_have_text("4")
    expect(page.locator('#batch-timeline tr[data-status="completed"]')).to_be_visible()
    output_tokens = page.locator('#batch-usage tr[data-usage="output"] td.num').text_content()
    assert output_tokens and int(output_tokens.replace(",", "")) > 0
    expect(page.locator('#batch-cost tr[data-cost="batch"] td.num')).to_contain_text(
        re.compile(r"\d")
    )
    saving = page.locator("#batch-saving").text_content() or ""
    assert re.search(r"\d.*\(\d+(\.\d)?%\)", saving), saving
    expect(page.locator("#cancel-batch")).to_have_count(0)
    expect(page.locator("#download-errors")).to_have_count(0)
    console.shot("03-batch-completed.png")
    with page.expect_download() as downloaded:
        page.click("#download-output")
    download = downloaded.value
    assert download.suggested_filename == f"{small}_output.jsonl"
    rows = [json.loads(line) for line in Path(download.path()).read_text().splitlines() if line]
    assert [r["custom_id"] for r in rows] == [f"small-{i}" for i in range(4)]
    assert all(r["response"]["status_code"] == 200 for r in rows)

    # The failed requests of a batch, by line, and its error file.
    page.click("#nav-batches")
    mixed_row.locator("td.id a").click()
    expect(page.locator("#batch-status")).to_have_text("completed")
    failures = page.locator("#batch-failures tbody tr")
    expect(failures).to_have_count(2)
    expect(failures.nth(0)).to_contain_text("too-long")
    expect(failures.nth(0).locator("td").first).to_have_text("2")
    expect(failures.nth(0)).to_contain_text("maximum context length")
    expect(failures.nth(1)).to_contain_text("no-such-model")
    console.shot("03a-request-failures.png")
    with page.expect_download() as downloaded:
        page.click("#download-errors")
    errors = [json.loads(line) for line in Path(downloaded.value.path()).read_text().splitlines()]
    assert sorted(e["custom_id"] for e in errors) == ["no-model", "too-long"]

    # A batch whose input did not validate: its errors with their lines.
    page.click("#nav-batches")
    invalid_row.locator("td.id a").click()
    expect(page.locator("#batch-status")).to_have_text("failed")
    validation = page.locator("#batch-validation-errors tbody tr")
    expect(validation).to_have_count(1)
    expect(validation.locator("td").first).to_have_text("2")
    expect(validation).to_contain_text("invalid_json_line")
    expect(page.locator("#download-output")).to_have_count(0)
    expect(page.locator("#cancel-batch")).to_have_count(0)
    console.shot("03a-validation-failed.png")

    # The Anthropic batch's results download through the Anthropic surface.
    page.click("#nav-batches")
    message_row.locator("td.id a").click()
    expect(page.locator("#batch-status")).to_have_text("completed")
    with page.expect_download() as downloaded:
        page.click("#download-output")
    results = Path(downloaded.value.path()).read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in results if line] == ["m-0"]

    # A bigger batch, cancelled from its page.
    big = submit(alice, "big", 60, max_tokens=48)
    page.click("#nav-batches")
    big_row = page.locator(f'#batches-table tr[data-batch-id="{big}"]')
    expect(big_row.locator(".status")).to_have_text("in_progress", timeout=SLOW)
    console.shot("03b-list-in-progress.png")
    big_row.locator("td.id a").click()
    expect(page.locator("#batch-status")).to_have_text("in_progress")
    expect(page.locator("#cancel-batch")).to_be_visible()
    console.shot("03c-batch-running.png")
    confirmations: list[str] = []
    page.on("dialog", lambda dialog: (confirmations.append(dialog.message), dialog.accept()))
    page.click("#cancel-batch")
    expect(page.locator("#batch-status")).to_have_text(re.compile("cancelling|cancelled"))
    assert wait_for(alice, big, timeout=120).status == "cancelled"
    expect(page.locator("#batch-status")).to_have_text("cancelled", timeout=QUICK)
    expect(page.locator("#cancel-batch")).to_have_count(0)
    assert len(confirmations) == 1 and big in confirmations[0], confirmations
    console.shot("04-cancelled.png")
    page.click("#nav-batches")
    expect(big_row.locator(".status")).to_have_text("cancelled")
    assert page.evaluate("window.__sameDocument") is True, "the console reloaded the page"

    # Usage: today's row and the totals.
    page.click("#nav-usage")
    usage = page.locator("#usage-table")
    expect(usage.locator("tbody tr").first).to_be_visible()
    expect(usage.locator("#usage-total")).to_contain_text("Total")
    console.shot("05-usage.png")
    console.assert_key_kept_in_session_storage_only(ALICE_KEY)

    # Log out: the key is gone; the admin logs in.
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    console.login(OPS_KEY)
    expect(page.locator("#nav-engines")).to_be_visible()
    page.click("#nav-engines")
    model_ids = [m.id for m in alice.models.list()]
    models = page.locator("#models-table")
    for model_id in model_ids:
        expect(models).to_contain_text(model_id)
    expect(page.locator("#engines-chart")).to_be_visible()
    expect(page.locator("#engines-chart rect.bar-batch").first).to_be_attached()
    expect(page.locator("#realtime-share")).to_contain_text("%")
    console.shot("06-engines.png")

    # Every tenant's batches, for the admin only when asked.
    page.click("#nav-batches")
    expect(page.locator("#batches-table")).to_be_visible()
    expect(page.locator(f'#batches-table tr[data-batch-id="{small}"]')).to_have_count(0)
    page.check("#all-tenants")
    admin_row = page.locator(f'#batches-table tr[data-batch-id="{small}"]')
    expect(admin_row.locator("td.tenant")).to_have_text("alice")
    expect(page.locator(f'#batches-table tr[data-batch-id="{big}"] .status')).to_have_text(
        "cancelled"
    )
    console.shot("07-all-tenants.png")
    console.assert_key_kept_in_session_storage_only(OPS_KEY)
    assert ALICE_KEY not in json.dumps(page.evaluate("Object.assign({}, sessionStorage)"))
    console.close()
