"""The chat page (/) and the dashboard (/dashboard) of `leapllm serve`: what the server sends (HTTP),
and what a person sees and does in a real headless Chromium (Debian's package, driven by Playwright).

The browser tests skip outside CI when no Chromium is installed; .ci/run installs it. With
LEAPLLM_DOCS_SCREENSHOTS=1 they also write the screenshots in docs/images/ that the README shows.
"""

from __future__ import annotations

import json
import re
import threading
import time
from html.parser import HTMLParser

import httpx
import pytest

from leapllm.cli.serve_cmd import model_facts
from leapllm.config import EngineConfig
from leapllm.engine.async_engine import AsyncEngine
from leapllm.engine.llm_engine import LLMEngine
from leapllm.serving import create_app
from leapllm.serving.runner import ServerThread
from leapllm.serving.web import STATIC
from tests.browser import open_page, screenshot
from tests.serving.conftest import (
    API_KEY,
    MODEL_NAME,
    RunningServer,
    assert_openai_error,
    read_metrics,
)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports")
    (folder / "bench.md").write_text("# Bench\n\n| system | tok/s |\n|---|---|\n| leapllm | **237** |\n")
    (folder / "bench.json").write_text(json.dumps({"decode": {"tok_s": 237}}))
    (folder / "profile.html").write_text("<html><body><h1>Profile</h1><script>parent.hacked = 1</script></body></html>")
    (folder / "notes.txt").write_text("not a report")
    return folder


@pytest.fixture(scope="module")
def web_server(llm, reports):
    """A server with the dashboard's inputs: the model's facts and a reports folder."""
    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=8, kv_cache_gb=0.1)),
                         max_waiting=32)
    app = create_app(engine, llm.tokenizer, MODEL_NAME, llm.config.context_length, model_facts=model_facts(llm),
                     reports_dir=str(reports))
    running = RunningServer(ServerThread(app).start(), engine)
    yield running
    running.thread.stop()


# -- what the server sends ---------------------------------------------------------------------------

class ScriptAudit(HTMLParser):
    """Every <script> of a page and every inline event handler attribute."""

    def __init__(self):
        super().__init__()
        self.scripts, self.handlers = [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.handlers += [name for name in attrs if name.startswith("on")]
        if tag == "script":
            self.scripts.append(attrs.get("src"))
            self._in_script = True

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.scripts.append(None)  # inline code


@pytest.mark.parametrize("path", ["/", "/dashboard"])
def test_pages_come_with_a_csp_that_allows_only_this_servers_scripts_and_hold_no_inline_script(web_server, path):
    response = httpx.get(web_server.url + path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-eval" not in csp and "default-src 'self'" in csp
    audit = ScriptAudit()
    audit.feed(response.text)
    assert audit.scripts and all(src and src.startswith("/static/") for src in audit.scripts)
    assert audit.handlers == []
    for src in audit.scripts:  # every script is served from the package, no CDN
        assert httpx.get(web_server.url + src).status_code == 200


def test_the_chart_library_is_vendored_with_its_license():
    vendor = STATIC / "vendor" / "uplot"
    assert (vendor / "uPlot.iife.min.js").stat().st_size > 10_000
    assert "MIT License" in (vendor / "LICENSE").read_text()


def test_metrics_json_samples_the_engine_once_a_second_with_the_models_facts(web_server):
    deadline = time.monotonic() + 30
    while True:
        data = httpx.get(f"{web_server.url}/metrics.json").json()
        if len(data["samples"]) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(data["samples"]) >= 2
    sample = data["samples"][-1]
    assert {"t", "prompt_tokens_per_s", "generated_tokens_per_s", "running", "waiting", "kv_blocks_used",
            "kv_blocks_total", "prefix_hit_rate", "spec_acceptance", "ttft_p50", "tpot_p90"} <= set(sample)
    assert data["samples"][-1]["t"] - data["samples"][-2]["t"] == pytest.approx(1.0, abs=0.5)
    assert data["model"]["architecture"] == "llama" and data["model"]["file"].endswith(".gguf")
    assert "path" not in data["model"]  # a local path is not the dashboard's business
    assert data["stats"]["kv_blocks_total"] == sample["kv_blocks_total"] and data["reports"] is True


def test_the_latency_percentiles_follow_finished_requests(web_server):
    client = web_server.openai()
    for _ in range(2):
        client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0)
    latency = httpx.get(f"{web_server.url}/metrics.json").json()["latency"]
    assert latency["requests"] >= 2
    assert 0 < latency["ttft"]["p50"] <= latency["ttft"]["p90"] <= latency["ttft"]["p99"]
    assert latency["tpot"]["p50"] > 0


def test_reports_lists_only_report_files_and_serves_them_as_attachments(web_server):
    listed = httpx.get(f"{web_server.url}/reports").json()["reports"]
    assert [r["name"] for r in listed] == ["bench.json", "bench.md", "profile.html"]
    response = httpx.get(f"{web_server.url}/reports/profile.html")
    assert response.status_code == 200 and response.headers["content-disposition"] == "attachment"
    assert response.headers["content-security-policy"] == "sandbox"
    for name in ("notes.txt", "..%2Fbench.md", "%2Fetc%2Fpasswd", "missing.md"):
        assert httpx.get(f"{web_server.url}/reports/{name}").status_code == 404, name


def test_reports_is_a_404_without_a_reports_folder(server):
    assert_openai_error(httpx.get(f"{server.url}/reports"), 404, code="not_found")


def test_with_an_api_key_the_pages_load_but_their_data_needs_the_key(guarded_server):
    url = guarded_server.url
    for path in ("/", "/dashboard", "/static/chat.js"):
        assert httpx.get(url + path).status_code == 200, path
    for path in ("/metrics.json", "/reports"):
        assert_openai_error(httpx.get(url + path), 401, code="invalid_api_key")
    ok = httpx.get(f"{url}/metrics.json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and "samples" in ok.json()
    assert httpx.get(f"{url}/metrics").status_code == 200  # Prometheus' scrape stays open


# -- in a real browser ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_prompt_streams_into_the_page_and_stop_aborts_it_and_frees_its_blocks(browser, web_server, page_errors,
                                                                               tmp_path):
    page = open_page(browser, web_server.url + "/", page_errors)
    page.locator("#model-name", has_text=MODEL_NAME).wait_for()
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "2000")
    aborted = read_metrics(web_server.url).get(("leapllm:request_aborted_total", ()), 0)
    page.fill("#prompt", "Tell me a long story about a dragon who learns to bake bread.")
    page.press("#prompt", "Enter")
    # Text arrives while the reply is still streaming (Stop is enabled only then).
    page.locator(".message.assistant .content p").first.wait_for(timeout=60_000)
    assert page.locator("#stop-button").is_enabled()
    first = page.locator(".message.assistant .content").inner_text()
    page.locator(".message.assistant .content").filter(
        has_text=re.compile(re.escape(first.strip()[:20]) + r"[\s\S]{40,}")).wait_for(timeout=60_000)
    assert web_server.stats()["kv_blocks_used"] > 0  # the reply holds KV blocks while it streams
    page.click("#stop-button")
    page.locator(".message.assistant .stats", has_text="stopped").wait_for()
    assert page.locator("#send").is_enabled() and page.locator("#stop-button").is_disabled()
    assert web_server.wait_idle()["kv_blocks_used"] == 0  # the aborted request gave its blocks back
    metrics = read_metrics(web_server.url)
    assert metrics[("leapllm:kv_cache_blocks_used", ())] == 0
    assert metrics[("leapllm:request_aborted_total", ())] == aborted + 1
    assert page_errors == []


@pytest.mark.slow
def test_a_finished_reply_shows_its_speed_and_the_sampling_controls_go_into_the_request(browser, web_server,
                                                                                      page_errors, tmp_path):
    page = open_page(browser, web_server.url + "/", page_errors)
    page.locator("#model-name", has_text=MODEL_NAME).wait_for()
    page.fill("#system-prompt", "You are a helpful assistant.")
    for field, value in (("#temperature", "0"), ("#top-k", "5"), ("#min-p", "0.05"), ("#max-tokens", "80"),
                         ("#seed", "7"), ("#stop", "###\nEND")):
        page.fill(field, value)
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#prompt", "Write a Python function that adds two numbers.")
        page.click("#send")
    body = json.loads(request.value.post_data)
    assert body["messages"] == [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": "Write a Python function that adds two numbers."}]
    assert (body["temperature"], body["top_k"], body["min_p"], body["max_tokens"], body["seed"]) == (0, 5, 0.05, 80, 7)
    assert body["stream"] is True and body["model"] == MODEL_NAME and body["stop"] == ["###", "END"]
    stats = page.locator(".message.assistant .stats", has_text="finish:")
    stats.wait_for(timeout=60_000)
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens · finish: (stop|length)", stats.inner_text())
    screenshot(page, "chat.png", tmp_path)
    # The conversation is kept in the browser: a reload shows it again.
    page.reload()
    assert page.locator(".message").count() == 2
    assert page_errors == []


@pytest.mark.slow
def test_the_json_schema_box_constrains_the_reply_and_a_broken_schema_is_refused_in_the_page(browser, web_server,
                                                                                           page_errors):
    page = open_page(browser, web_server.url + "/", page_errors)
    page.locator("#model-name", has_text=MODEL_NAME).wait_for()
    page.fill("#json-schema", "{not json")
    page.fill("#prompt", "Hi")
    page.click("#send")
    page.locator("#settings-error", has_text="the JSON schema is not JSON").wait_for()
    assert page.locator(".message").count() == 0  # nothing was sent
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    page.fill("#json-schema", json.dumps(schema))
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.fill("#prompt", "Name a city in France, as JSON.")
    page.click("#send")
    page.locator(".message.assistant .stats", has_text="finish: stop").wait_for(timeout=60_000)
    reply = json.loads(page.locator(".message.assistant .content").inner_text())
    assert set(reply) == {"city"} and isinstance(reply["city"], str)
    assert page_errors == []


@pytest.mark.slow
def test_a_script_in_a_prompt_is_shown_as_text_and_never_runs(browser, web_server, page_errors):
    page = open_page(browser, web_server.url + "/", page_errors)
    page.locator("#model-name", has_text=MODEL_NAME).wait_for()
    page.fill("#max-tokens", "8")
    prompt = '<script>alert("x")</script><img src=x onerror="alert(1)"> hello'
    page.fill("#prompt", prompt)
    page.click("#send")
    page.locator(".message.assistant .stats", has_text="finish:").wait_for(timeout=60_000)
    assert page.locator(".message.user .content").inner_text() == prompt
    assert page.locator(".messages script, .messages img").count() == 0
    assert page_errors == []  # no alert dialog, no error


def test_markdown_and_code_in_a_reply_are_rendered_as_elements_with_text_only(browser, web_server, page_errors):
    reply = ("# Title\n\nSome **bold** and `code`, a [link](https://example.org) and "
             "<img src=x onerror=alert(1)>.\n\n```python\nprint('<b>hi</b>')\n```\n\n"
             "| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n")
    stored = [{"role": "user", "content": "show me"}, {"role": "assistant", "content": reply, "stats": {"tokens": 9}}]
    state = {"cookies": [], "origins": [{"origin": web_server.url,
                                         "localStorage": [{"name": "leapllm.chat", "value": json.dumps(stored)}]}]}
    page = open_page(browser, web_server.url + "/", page_errors, storage_state=state)
    content = page.locator(".message.assistant .content")
    assert content.locator("h3").inner_text() == "Title"
    assert content.locator("strong").inner_text() == "bold"
    assert content.locator("pre code.language-python").inner_text() == "print('<b>hi</b>')"
    assert content.locator("table td").all_inner_texts() == ["1", "2"]
    assert content.locator("li").all_inner_texts() == ["one", "two"]
    assert content.locator("a").get_attribute("href") == "https://example.org"
    assert content.locator("img, b, script").count() == 0 and "<img src=x onerror=alert(1)>" in content.inner_text()
    assert page_errors == []


@pytest.mark.slow
def test_the_dashboard_charts_update_while_a_load_runs(browser, web_server, page_errors, tmp_path):
    page = open_page(browser, web_server.url + "/dashboard", page_errors)
    page.locator("#chart-tokens canvas").wait_for(timeout=30_000)
    page.locator("#model-facts th", has_text="architecture").wait_for()
    client = web_server.openai()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=32, temperature=0)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # The charts' data grows each second, and the generated tokens/s and running requests show the load.
        before = int(page.locator("#chart-tokens").get_attribute("data-points"))
        page.locator("#chart-tokens:not([data-peak='0'])").wait_for(timeout=60_000)
        page.locator("#chart-requests:not([data-peak='0'])").wait_for(timeout=60_000)
        page.locator("#chart-kv:not([data-peak='0'])").wait_for(timeout=60_000)
        time.sleep(2.5)
        assert int(page.locator("#chart-tokens").get_attribute("data-points")) > before
        screenshot(page, "dashboard.png", tmp_path)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert float(page.locator("#chart-tokens").get_attribute("data-peak")) > 0
    assert page_errors == []


def test_the_dashboard_shows_reports_markdown_as_elements_and_html_in_a_scriptless_frame(browser, web_server,
                                                                                        page_errors):
    page = open_page(browser, web_server.url + "/dashboard", page_errors)
    page.locator("#report-list button", has_text="bench.md").click()
    page.locator("#report-view table td strong", has_text="237").wait_for()
    page.locator("#report-list button", has_text="bench.json").click()
    page.locator("#report-view pre", has_text='"tok_s": 237').wait_for()
    page.locator("#report-list button", has_text="profile.html").click()
    frame = page.frame_locator("#report-view iframe")
    frame.locator("h1", has_text="Profile").wait_for()
    assert page.locator("#report-view iframe").get_attribute("sandbox") == ""
    # Chromium blocked the report's script (it says so on the console) and nothing else went wrong.
    assert any("sandboxed" in e for e in page_errors)
    assert [e for e in page_errors if "sandboxed" not in e] == []


@pytest.mark.slow
def test_with_an_api_key_the_page_asks_for_it_then_chats(browser, guarded_server, page_errors):
    page = open_page(browser, guarded_server.url + "/", page_errors)
    page.locator("#key-dialog[open]").wait_for()
    page.fill("#key-input", API_KEY)
    page.click("#key-dialog button[value='save']")
    page.locator("#model-name", has_text=MODEL_NAME).wait_for()
    page.fill("#max-tokens", "6")
    page.fill("#prompt", "Hi")
    page.click("#send")
    page.locator(".message.assistant .stats", has_text="finish:").wait_for(timeout=60_000)
    assert page.locator(".message.assistant .error").count() == 0
    # 401s of the first try are console errors of the browser's own; nothing else went wrong.
    assert [e for e in page_errors if "401" not in e] == []
