"""The web page at /ui in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium) against the session's HTTP server: load two documents through the page,
activate one with a click, ask in the chat box and watch the answer stream, find the prompt
and answer under the document in the drawn tree, and read the context back through the REST
API. A screenshot of each step is saved in the test's temporary directory."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
from http_fixture import KEY, Served

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "server" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1200",
]
FERRY = (
    "Harbor notes. The night ferry to Sandhamn is called the Grey Heron and leaves Strandvägen "
    "at 23:40. Its captain is Marta Oyelaran, who has sailed the route for twelve years."
)
MUSEUM = "Museum notes. The maritime museum on Djurgården is closed on Mondays in winter."
QUESTION = "What is the name of the night ferry, and who is its captain?"


def chromium_missing() -> str | None:
    if not Path(CHROMIUM).is_file() or not Path(CHROMEDRIVER).is_file():
        return (
            f"needs Chromium and its driver ({CHROMIUM}, {CHROMEDRIVER}): "
            "apt-get install chromium chromium-driver (make test does it where it can)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs the selenium package (pip install -e '.[dev]')"
    return None


MISSING = chromium_missing()
needs_chromium = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(check: Callable, what: str, timeout: float = 30.0):
    """check()'s first truthy value, polled; fails with `what` after `timeout` seconds. An
    element the page drew again between finding and reading it is read again."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except StaleElementReferenceException:  # the page redraws after a refresh
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Page:
    """The page in the browser, by the ids and data attributes the page's scripts set."""

    def __init__(self, driver, shots: Path):
        self.driver, self.shots, self.step = driver, shots, 0

    def shot(self, name: str) -> None:
        self.step += 1
        self.driver.save_screenshot(str(self.shots / f"{self.step}-{name}.png"))

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def type(self, element_id: str, text: str) -> None:
        field = self.find(f"#{element_id}")
        field.clear()
        field.send_keys(text)

    def choose(self, element_id: str, value: str) -> None:
        from selenium.webdriver.support.select import Select

        Select(self.find(f"#{element_id}")).select_by_value(value)

    def row_hashes(self) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll('#chunk-table tbody tr')]"
            ".map(r => r.dataset.hash)"
        )

    def pool_counts(self) -> tuple[int, str] | None:
        """The rows whose tier is gpu, and the pool meter's line, read at one moment (None
        before the meter is drawn)."""
        return self.js(
            "const tiers = [...document.querySelectorAll('#chunk-table select.tier')];"
            "const meter = document.querySelector('[data-tier=\"KV pool (gpu)\"] span');"
            "return meter && [tiers.filter(s => s.value === 'gpu').length, meter.textContent];"
        )

    def active_list(self) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll('#active-list li')].map(li => li.dataset.hash)"
        )

    def edges(self) -> set[tuple[str, str]]:
        pairs = self.js("return cy.edges().map(e => [e.source().id(), e.target().id()])")
        return {tuple(p) for p in pairs}

    def node(self, chunk_hash: str) -> dict | None:
        return self.js(
            "const n = cy.getElementById(arguments[0]);"
            "return n.empty() ? null : {type: n.data('type'), active: n.hasClass('active')};",
            chunk_hash,
        )

    def click_node(self, chunk_hash: str) -> None:
        """A real mouse click where Cytoscape drew the node."""
        from selenium.webdriver.common.action_chains import ActionChains

        x, y, width, height = self.js(
            "const p = cy.getElementById(arguments[0]).renderedPosition();"
            "const box = document.getElementById('graph').getBoundingClientRect();"
            "return [p.x, p.y, box.width, box.height];",
            chunk_hash,
        )
        graph = self.find("#graph")
        ActionChains(self.driver).move_to_element_with_offset(
            graph, int(x - width / 2), int(y - height / 2)
        ).click().perform()


def open_on(page: Page, served: Served, context: str) -> None:
    """The page on `context`, the key given, as a returning user has them."""
    page.driver.get(f"{served.url}/ui")
    page.js(
        "localStorage.setItem('kvchunks.apiKey', arguments[0]);"
        "localStorage.setItem('kvchunks.context', arguments[1]);",
        KEY,
        context,
    )
    page.driver.refresh()
    wait_for(lambda: page.find("#context-select").get_attribute("value") == context, "the page")


def status(page: Page) -> tuple[bool, str, str]:
    """The status line: (shown, text, class)."""
    return page.js(
        "const line = document.getElementById('status');"
        "return [!line.hidden, line.textContent, line.className];"
    )


def children_of(served: Served, context: str, parents: list[str]) -> list[dict]:
    with served.http() as http:
        chunks = http.get("/v1/chunks", params={"context": context}).json()["data"]
    return [c for c in chunks if c["parent_chunks"] == parents]


@needs_chromium
def test_documents_activation_chat_and_tree_through_the_page(served, browser, tmp_path):
    page = Page(browser, tmp_path)
    context = f"web-{uuid.uuid4().hex[:8]}"
    browser.get(f"{served.url}/ui")
    # Without the key the page loads and says what it needs; with it, the data comes.
    wait_for(lambda: "API key" in page.find("#status").text, "the page to ask for the key")
    page.type("api-key", KEY)
    page.find("#key-form button").click()
    # A name the server refuses is said so, and not kept: the page stays where it was.
    shown = wait_for(lambda: page.find("#context-select").get_attribute("value"), "a context")
    page.type("context-name", "no spaces allowed")
    page.find("#context-new button").click()
    wait_for(lambda: "invalid context name" in page.find("#status").text, "the refusal")
    wait_for(lambda: page.find("#context-select").get_attribute("value") == shown, "back")
    stored = "return localStorage.getItem('kvchunks.context')"
    assert page.js(stored) != "no spaces allowed"
    page.type("context-name", context)
    page.find("#context-new button").click()
    wait_for(lambda: page.find("#context-select").get_attribute("value") == context, "context")
    wait_for(lambda: page.js(stored) == context, "the context kept once the server took it")
    page.shot("key-and-context")

    documents = {}
    for name, text in (("harbor-notes", FERRY), ("museum-notes", MUSEUM)):
        before = set(page.row_hashes())
        page.type("doc-text", text)
        page.type("doc-name", name)
        page.type("doc-tags", "notes web")
        page.find("#doc-load").click()
        added = wait_for(lambda b=before: set(page.row_hashes()) - b, f"{name} in the table")
        (documents[name],) = added
        # Read with the table, as the page draws the meters with it (once it has usage).
        in_pool, meter = wait_for(page.pool_counts, "the pool meter")
        assert meter.endswith(f", {in_pool} chunks"), (in_pool, meter)
    ferry, museum = documents["harbor-notes"], documents["museum-notes"]
    with served.http() as http:
        for chunk_hash, text in ((ferry, FERRY), (museum, MUSEUM)):
            chunk = http.get(f"/v1/chunks/{chunk_hash}").json()
            assert chunk["text"] == text and set(chunk["tags"]) == {"notes", "web"}
    page.shot("documents-loaded")

    page.find(f'#chunk-table tr[data-hash="{ferry}"] button.toggle').click()
    wait_for(lambda: page.active_list() == [ferry], "the document in the active list")
    page.shot("document-activated")

    page.type("max-tokens", "40")
    page.type("chat-input", QUESTION)
    page.find("#chat-send").click()
    seen: list[str] = []  # the answer's text at each read while it streams
    while page.js("return document.querySelector('.turn:last-child').dataset.done") is None:
        text = page.js("return document.querySelector('.turn:last-child .answer').textContent")
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            if len(seen) == 1:
                page.shot("answer-streaming")
        time.sleep(0.02)
    turn = page.find(".turn:last-child")
    assert turn.get_attribute("data-done") == "true", turn.text
    answer_text = page.find(".turn:last-child .answer").text
    facts = page.find(".turn:last-child .facts").text
    assert len(seen) >= 2 and all(answer_text.startswith(s.strip()) for s in seen), seen
    assert "mode realign" in facts and "tokens reused" in facts and "first token" in facts, facts
    page.shot("answered")

    (prompt,) = children_of(served, context, [ferry])
    (answer,) = children_of(served, context, [ferry, prompt["hash"]])
    assert prompt["text"] == QUESTION and answer["text"].strip() == answer_text.strip()
    wait_for(
        lambda: {(ferry, prompt["hash"]), (prompt["hash"], answer["hash"])} <= page.edges(),
        "the prompt under the document and the answer under the prompt in the tree",
    )
    assert page.node(ferry) == {"type": "document", "active": True}
    assert page.node(museum) == {"type": "document", "active": False}
    assert page.node(prompt["hash"]) == {"type": "prompt", "active": False}
    assert page.node(answer["hash"]) == {"type": "answer", "active": False}
    page.choose("graph-scope", "active")  # only the trees in use: the document's
    wait_for(lambda: page.node(museum) is None, "the other document out of the tree")
    assert {(ferry, prompt["hash"]), (prompt["hash"], answer["hash"])} <= page.edges()
    page.click_node(answer["hash"])
    wait_for(lambda: page.find("#details-text").text.strip() == answer["text"].strip(), "details")
    page.shot("tree")

    with served.http() as http:
        view = http.get(f"/v1/contexts/{context}").json()
    shown_active = page.js(
        "return [...document.querySelectorAll('#chunk-table tr.is-active')]"
        ".map(r => r.dataset.hash)"
    )
    assert [c["hash"] for c in view["chunks"]] == page.active_list() == shown_active == [ferry]


@needs_chromium
def test_an_answer_stopped_from_the_page_keeps_what_it_said(served, browser, tmp_path):
    """While an answer comes, the send button stops it as a Ctrl-C does: the server keeps
    the question and the answer so far, marked interrupted, and the page says so and names
    them; one stopped before its first token keeps nothing, and the page says that."""
    page = Page(browser, tmp_path)
    context = f"web-stop-{uuid.uuid4().hex[:8]}"
    open_on(page, served, context)
    llm = served.cm.store.model.llm
    question = "Tell me a long story about a lighthouse keeper and the sea."
    page.type("max-tokens", "500")
    page.type("chat-input", question)
    page.find("#chat-send").click()
    last_turn = "return document.querySelector('.turn:last-child')"
    wait_for(lambda: page.js(f"{last_turn}.querySelector('.answer').textContent"), "words")
    assert page.find("#chat-send").text == "stop"
    page.find("#chat-send").click()
    wait_for(lambda: page.js(f"{last_turn}.dataset.done") == "stopped", "the answer stopped")
    assert page.find("#chat-send").text == "send"
    wait_for(llm.scheduler.is_finished, "the answer stopped on the server", 20)
    prompt = next(c for c in served.cm.list_chunks() if c.type == "prompt" and c.text == question)
    answer = next(c for c in served.cm.list_chunks() if prompt.hash in c.parent_chunks)
    shown = page.js(f"{last_turn}.querySelector('.answer').textContent")
    assert answer.metadata["interrupted"] and answer.text.startswith(shown) and shown
    told = page.find(".turn:last-child .facts").text
    assert told.startswith("stopped: the answer so far was kept, marked interrupted · "), told
    assert told.endswith(f"prompt {prompt.hash[:12]} → answer {answer.hash[:12]}"), told

    before = {c.hash for c in served.cm.list_chunks()}
    hooks = [
        layer.register_forward_hook(lambda *_: time.sleep(0.1)) for layer in llm.runner.model.layers
    ]
    try:  # a pass of 3 s: the stop comes before the first token
        page.type("chat-input", "And what did the keeper see?")
        page.find("#chat-send").click()
        time.sleep(0.5)
        page.find("#chat-send").click()
        wait_for(lambda: page.js(f"{last_turn}.dataset.done") == "stopped", "stopped early")
    finally:
        for hook in hooks:
            hook.remove()
    told = page.find(".turn:last-child .facts").text
    assert told == "stopped before the first token: nothing was kept", told
    assert {c.hash for c in served.cm.list_chunks()} == before


# The chat's reply as the page sees it, held back once the server has sent all of it (so
# stored the answer) until the test lets it go: a stop in between comes too late.
HOLD_BACK_THE_END = """
const fetched = window.fetch;
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return fetched(url, init);
  const whole = await fetched(url, init);
  const text = await whole.text();
  window.answerStored = true;
  await new Promise((go) => (window.letTheEndGo = go));
  return new Response(text, { status: 200, headers: whole.headers });
};
"""


@needs_chromium
def test_a_stop_after_the_answer_was_stored_finds_it_whole(served, browser, tmp_path):
    page = Page(browser, tmp_path)
    context = f"web-late-stop-{uuid.uuid4().hex[:8]}"
    open_on(page, served, context)
    question = "Which bird nests in the old barn?"
    page.type("max-tokens", "4")
    page.js(HOLD_BACK_THE_END)
    page.type("chat-input", question)
    page.find("#chat-send").click()
    wait_for(lambda: page.js("return window.answerStored === true"), "the stored answer", 60)
    assert page.find("#chat-send").text == "stop"
    page.find("#chat-send").click()  # no request of that name is running any more: a 404
    wait_for(lambda: page.js("return document.querySelector('#chat-send').disabled"), "stop")
    page.js("window.letTheEndGo()")
    last_turn = "return document.querySelector('.turn:last-child')"
    wait_for(lambda: page.js(f"{last_turn}.dataset.done") == "true", "the whole answer")
    prompt = next(c for c in served.cm.list_chunks() if c.type == "prompt" and c.text == question)
    answer = next(c for c in served.cm.list_chunks() if prompt.hash in c.parent_chunks)
    assert not answer.metadata.get("interrupted")
    told = page.find(".turn:last-child .facts").text
    assert "stopped" not in told and "no running request" not in status(page)[1], told
    assert told.endswith(f"prompt {prompt.hash[:12]} → answer {answer.hash[:12]}"), told


@needs_chromium
def test_dragging_an_active_chunk_reorders_the_context(served, browser, tmp_path):
    page = Page(browser, tmp_path)
    context = f"web-{uuid.uuid4().hex[:8]}"
    with served.http() as http:
        hashes = []
        for text in (FERRY, MUSEUM):
            hashes.append(http.post("/v1/chunks", json={"text": text}).json()["hash"])
            http.post(f"/v1/contexts/{context}/activate", json={"chunk": hashes[-1]})
    open_on(page, served, context)
    wait_for(lambda: page.active_list() == hashes, "the two active chunks")
    # Chromium's drag and drop is not driven by WebDriver: the page's own handlers get the
    # events a drag of the second item onto the first makes.
    page.js(
        "const [first, second] = document.querySelectorAll('#active-list li');"
        "const data = new DataTransfer();"
        "second.dispatchEvent(new DragEvent('dragstart', {bubbles: true, dataTransfer: data}));"
        "first.dispatchEvent(new DragEvent('dragover', {bubbles: true, cancelable: true,"
        " dataTransfer: data}));"
        "first.dispatchEvent(new DragEvent('drop', {bubbles: true, cancelable: true,"
        " dataTransfer: data}));"
    )
    wait_for(lambda: page.active_list() == hashes[::-1], "the new order on the page")
    with served.http() as http:
        view = http.get(f"/v1/contexts/{context}").json()
    assert [c["hash"] for c in view["chunks"]] == hashes[::-1]
    page.shot("reordered")
    # The keyboard does it too: Alt+Down moves the focused chunk one place down.
    from selenium.webdriver.common.keys import Keys

    page.find(f'#active-list li[data-hash="{hashes[1]}"]').send_keys(Keys.ALT, Keys.ARROW_DOWN)
    wait_for(lambda: page.active_list() == hashes, "the order the keyboard made")
    with served.http() as http:
        view = http.get(f"/v1/contexts/{context}").json()
    assert [c["hash"] for c in view["chunks"]] == hashes


@needs_chromium
def test_deleting_a_context_forgets_it_and_keeps_its_chunks(served, browser):
    page = Page(browser, Path())
    context = f"web-{uuid.uuid4().hex[:8]}"
    with served.http() as http:
        chunk = http.post("/v1/chunks", json={"text": f"Kept {uuid.uuid4()}."}).json()
        http.post(f"/v1/contexts/{context}/activate", json={"chunk": chunk["hash"]})
        http.post(f"/v1/contexts/{context}/settings", json={"mode": "exact"})
        before = http.get(f"/v1/contexts/{context}").json()
        open_on(page, served, context)
        wait_for(lambda: page.active_list() == [chunk["hash"]], "the active chunk")
        page.find("#context-delete").click()
        question = wait_for(lambda: alert_text(page), "the question whether to delete it")
        assert context in question and "no chunk is deleted" in question
        page.driver.switch_to.alert.dismiss()  # not now: nothing changes
        assert http.get(f"/v1/contexts/{context}").json() == before
        page.find("#context-delete").click()
        wait_for(lambda: alert_text(page), "the question asked again")
        page.driver.switch_to.alert.accept()
        wait_for(lambda: status(page)[1] == f"context {context} deleted", "the deletion")
        assert page.find("#context-select").get_attribute("value") == "default"
        names = [
            o.get_attribute("value")
            for o in page.driver.find_elements("css selector", "#context-select option")
        ]
        assert context not in names
        assert context not in http.get("/v1/contexts").json()["data"]
        fresh = http.get(f"/v1/contexts/{context}").json()
        assert (fresh["mode"], fresh["chunks"]) == ("realign", [])
        assert http.get(f"/v1/chunks/{chunk['hash']}").status_code == 200


@needs_chromium
def test_the_page_shows_what_the_server_kept_after_a_refusal_or_an_outage(served, browser):
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, Path())
    context = f"web-{uuid.uuid4().hex[:8]}"
    with served.http() as http:
        http.post(f"/v1/contexts/{context}/settings", json={"mode": "realign", "recompute": 0.5})

        def recompute() -> float | None:
            return http.get(f"/v1/contexts/{context}").json()["recompute"]

        open_on(page, served, context)
        wait_for(lambda: page.find("#recompute").get_attribute("value") == "0.5", "the setting")
        # Text that is no number is refused, not sent as "no setting"; a number the server
        # refuses leaves the field showing what the server kept.
        for typed, said in (("1e", "recompute must be a number"), ("5", "recompute must be")):
            field = page.find("#recompute")  # typed over, as a user does (no clearing first)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(typed, Keys.TAB)
            wait_for(lambda s=said: s in status(page)[1], f"{typed!r} refused")
            wait_for(lambda: page.find("#recompute").get_attribute("value") == "0.5", "0.5")
            assert recompute() == 0.5
        # A key that cannot travel in a header is refused when it is given.
        page.type("api-key", "ключ")
        page.find("#key-form button").click()
        wait_for(lambda: "printable ASCII" in status(page)[1], "the key refused")
        assert page.js("return localStorage.getItem('kvchunks.apiKey')") == KEY
        # An input method's Enter confirms a conversion: it does not send the question.
        page.js(
            "const box = document.getElementById('chat-input'); box.value = 'にほんご';"
            "box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true,"
            " bubbles: true, cancelable: true}));"
        )
        assert page.js("return document.querySelectorAll('.turn').length") == 0
        assert page.find("#chat-input").get_attribute("value") == "にほんご"
        # Enter skips the form's own checks: max tokens 0 is the server's to refuse.
        chunks = len(http.get("/v1/chunks").json()["data"])
        page.type("max-tokens", "0")
        page.type("chat-input", "Hello?")
        page.find("#chat-input").send_keys(Keys.ENTER)
        wait_for(
            lambda: page.js("return document.querySelector('.turn')?.dataset.done") == "error",
            "the refusal in the chat",
        )
        assert "max_tokens" in page.find(".turn .facts").text
        assert len(http.get("/v1/chunks").json()["data"]) == chunks
        # A change made elsewhere while the user types shows once they stop. (The page
        # notices a change by the store's counters: the move counts an eviction.)
        page.find("#chat-input").click()
        made = http.post("/v1/chunks", json={"text": f"Made elsewhere {uuid.uuid4()}."}).json()
        http.post(f"/v1/chunks/{made['hash']}/move", json={"tier": "cpu"})
        time.sleep(3.5)  # one poll of the page's while the user is in the chat box
        page.js("document.activeElement.blur()")
        wait_for(lambda: made["hash"] in page.row_hashes(), "the new chunk on the page", 10)
    # With the server out of reach, a context switch says so and the page stays where it was;
    # the message goes once the server answers again.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/*"]})
    try:
        page.choose("context-select", "default")
        wait_for(lambda: "cannot be reached" in status(page)[1], "the outage said")
        assert page.find("#context-select").get_attribute("value") == context
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    wait_for(lambda: not status(page)[0], "the outage message gone", 10)
    assert page.find("#context-select").get_attribute("value") == context
    # Snippets are cut between characters, never inside an emoji's two UTF-16 units.
    cut = page.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/ui/util.js').then(u => done(u.snippet('x'.repeat(88) + '🎉🎉🎉', 90)));"
    )
    assert cut == "x" * 88 + "🎉…"


@needs_chromium
def test_declining_to_delete_a_chunks_views_keeps_it_without_an_error(served, browser):
    page = Page(browser, Path())
    context = f"web-{uuid.uuid4().hex[:8]}"
    with served.http() as http:
        source = http.post("/v1/chunks", json={"text": f"Source {uuid.uuid4()}."}).json()
        other = http.post("/v1/chunks", json={"text": f"Other {uuid.uuid4()}."}).json()
        view = http.post(
            "/v1/chunks/compose", json={"chunks": [source["hash"], other["hash"]]}
        ).json()
        open_on(page, served, context)
        page.find(f'#chunk-table tr[data-hash="{source["hash"]}"] button.delete').click()
        wait_for(lambda: alert_text(page), "the question whether to delete it")
        page.driver.switch_to.alert.accept()
        question = wait_for(lambda: alert_text(page), "the question about its views")
        assert view["hash"][:12] in question and "cascade" not in question
        page.driver.switch_to.alert.dismiss()  # not them
        wait_for(lambda: status(page)[0], "the answer")
        assert status(page)[1:] == [f"{source['hash'][:12]} kept", "status ok"]
        for chunk in (source, view):
            assert http.get(f"/v1/chunks/{chunk['hash']}").status_code == 200


def alert_text(page: Page) -> str | None:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return page.driver.switch_to.alert.text
    except NoAlertPresentException:
        return None


@needs_chromium
def test_many_separate_documents_draw_a_readable_tree(served, browser):
    page = Page(browser, Path())
    with served.http() as http:
        for i in range(40):
            http.post("/v1/chunks", json={"text": f"Note {i}: {uuid.uuid4()}."})
        listed = len(http.get("/v1/chunks").json()["data"])
    open_on(page, served, "default")
    wait_for(lambda: page.js("return cy.nodes().length") == listed, "every chunk drawn")
    # The trees are laid out in rows, not in one row of 40 and more documents side by side.
    zoom = page.js("return cy.zoom()")
    assert zoom > 0.25, zoom


@needs_chromium
def test_the_tree_is_walked_and_a_node_shown_from_the_keyboard(served, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, tmp_path)
    context = f"web-{uuid.uuid4().hex[:8]}"
    with served.http() as http:
        # A document with three views hanging under it: a composed one and a split's two parts.
        other = http.post("/v1/chunks", json={"text": f"Other {uuid.uuid4()}."}).json()
        root = http.post("/v1/chunks", json={"text": f"{MUSEUM} {uuid.uuid4()}"}).json()
        http.post("/v1/chunks/compose", json={"chunks": [other["hash"], root["hash"]]})
        http.post(f"/v1/chunks/{root['hash']}/split", json={"at": 5})
        http.post(f"/v1/contexts/{context}/activate", json={"chunk": root["hash"]})
        listed = http.get("/v1/chunks", params={"context": context}).json()["data"]
    chunks = {c["hash"]: c for c in listed}
    below = {c["hash"] for c in listed if c["follows"] == root["hash"]}
    assert len(below) == 3
    open_on(page, served, context)
    page.choose("graph-scope", "active")  # the document's tree alone
    wait_for(lambda: page.js("return cy.nodes().length") == 4, "the tree drawn")

    def focused() -> dict:
        return page.js(
            "const item = document.activeElement, box = item.getBoundingClientRect();"
            "const graph = document.getElementById('graph').getBoundingClientRect();"
            "return {hash: item.dataset.hash, role: item.getAttribute('role'),"
            " name: item.getAttribute('aria-label'), ring: getComputedStyle(item).outlineStyle,"
            " seen: box.top >= graph.top && box.bottom <= Math.min(graph.bottom, innerHeight),"
            " stops: document.querySelectorAll('#graph-keys [tabindex=\"0\"]').length};"
        )

    def press(key: str) -> str:
        ActionChains(browser).send_keys(key).perform()
        now = focused()
        chunk = chunks[now["hash"]]
        text = " ".join(chunk["text"].split())[:30]
        active = ", active" if chunk["is_active"] else ""
        assert now["role"] == "treeitem" and now["name"].startswith(
            f"{chunk['type']}{active}: {text}"
        ), now
        assert now["ring"] != "none" and now["seen"] and now["stops"] == 1, now
        return now["hash"]

    page.find("#graph-scope").send_keys(Keys.TAB)  # one tab stop into the tree: its root
    wait_for(lambda: focused()["hash"] == root["hash"], "the root focused by Tab")
    assert press(Keys.ARROW_UP) == root["hash"]  # nothing above a root
    first = press(Keys.ARROW_DOWN)
    walked = [first, press(Keys.ARROW_RIGHT), press(Keys.ARROW_RIGHT)]
    assert set(walked) == below and press(Keys.ARROW_RIGHT) == walked[-1]
    assert press(Keys.ARROW_LEFT) == walked[1]
    assert press(Keys.ARROW_UP) == root["hash"]
    assert press(Keys.ARROW_DOWN) == walked[1]  # back to the child it came up from
    page.shot("tree-keys")
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait_for(
        lambda: page.find("#details-text").text.strip() == chunks[walked[1]]["text"].strip(),
        "the chunk reached shown in the details",
    )
    assert focused()["hash"] == walked[1]  # the focus stays in the tree
    assert press(Keys.ARROW_RIGHT) == walked[2]
    ActionChains(browser).send_keys(Keys.SPACE).perform()
    wait_for(
        lambda: page.find("#details-text").text.strip() == chunks[walked[2]]["text"].strip(),
        "Space shows the chunk as Enter does",
    )

    # An answer arrives while the keyboard is in the tree: the tree is drawn again with the
    # prompt and answer, and the focus stays on its node; when that node is gone meanwhile
    # (deleted elsewhere), on the node above it.
    def answer_while_walking(on: str, question: str, delete: bool) -> None:
        drawn = page.js("return cy.nodes().length")
        page.type("max-tokens", "40")
        page.type("chat-input", question)
        ActionChains(browser).send_keys(Keys.ENTER).perform()
        page.js("document.querySelector(`#graph-keys [data-hash='${arguments[0]}']`).focus()", on)
        if delete:
            with served.http() as http:
                assert http.delete(f"/v1/chunks/{on}").status_code == 200
        assert page.js("return document.querySelector('.turn:last-child').dataset.done") is None
        wait_for(
            lambda: page.js("return document.querySelector('.turn:last-child').dataset.done"),
            "the answer",
        )
        wait_for(lambda: page.js("return cy.nodes().length") != drawn, "the tree drawn again")

    answer_while_walking(walked[0], QUESTION, delete=False)
    assert focused()["hash"] == walked[0]
    (prompt,) = [c for c in children_of(served, context, [root["hash"]]) if c["text"] == QUESTION]
    (answer,) = children_of(served, context, [root["hash"], prompt["hash"]])
    # The answer's parent is not the tree's first node, where a lost focus would land.
    answer_while_walking(answer["hash"], "When is the museum closed?", delete=True)
    assert focused()["hash"] == prompt["hash"]
    chunks[prompt["hash"]] = prompt
    assert press(Keys.ARROW_UP) == root["hash"]  # the keys go on from there


def test_the_page_loads_without_the_key_and_the_data_does_not(served):
    with served.http(key=None) as http:
        assert http.get("/ui", follow_redirects=True).text.startswith("<!doctype html>")
        for asset in ("app.js", "style.css", "vendor/cytoscape.min.js"):
            assert http.get(f"/ui/{asset}").status_code == 200, asset
        for path in ("/v1/usage", "/v1/contexts", "/ui/../v1/chunks", "/ui/%2e%2e/v1/chunks"):
            response = http.get(path)
            assert response.status_code in (401, 404), (path, response.status_code)
            assert "data" not in response.text
    with served.http() as http:
        usage = http.get("/v1/usage").json()
        assert {"pool", "host_bytes", "disk_bytes", "host_budget", "disk_budget"} <= set(usage)
        assert 'route="/ui",status="200"' in http.get("/metrics").text


def test_reorder_takes_every_active_chunk_once(served):
    context = f"order-{uuid.uuid4().hex[:8]}"
    with served.http() as http:
        first = http.post("/v1/chunks", json={"text": FERRY}).json()["hash"]
        http.post(f"/v1/contexts/{context}/activate", json={"chunk": first})
        refused = http.post(f"/v1/contexts/{context}/order", json={"chunks": [first, first]})
        assert refused.status_code == 400, refused.text
        assert http.post(f"/v1/contexts/{context}/order", json={"chunks": [first[:8]]}).is_success
        assert context in http.get("/v1/contexts").json()["data"]


def matches(path: str, pattern: str) -> bool:
    """setuptools' glob: `*` does not cross a folder."""
    return len(PurePosixPath(path).parts) == len(PurePosixPath(pattern).parts) and PurePosixPath(
        path
    ).match(pattern)


def test_every_file_of_the_page_is_package_data():
    """An installed package serves the page: pyproject's package-data covers each file."""
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(ROOT / "pyproject.toml")
    patterns = config["tool"]["setuptools"]["package-data"]["kvchunks.server"]
    files = [p.relative_to(ROOT / "server").as_posix() for p in UI.rglob("*") if p.is_file()]
    assert files
    missed = [f for f in files if not any(matches(f, p) for p in patterns)]
    assert not missed, missed
