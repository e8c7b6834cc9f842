"""The chat page at / in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against real API servers on 127.0.0.1: SmolLM2 for answers, tiny-random with API keys for the 401 path.
Screenshots mid-answer (desktop and phone width) go to the session's temp folder (pytest's basetemp), browser/."""
from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest

from conftest import DOWNLOADS
from pipeline.server.launch import ApiServer

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "sk-page-test"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover
    webdriver = None


def _skip_reason() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install selenium)"
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        return "Chromium not installed: apt-get install -y chromium chromium-driver (.ci/run does this)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_cache):
    s = ApiServer(tmp_path_factory.mktemp("page_smol"), "quant=fp16", "serve.session_len=512", "serve.max_batch_size=4",
                  f"download_dir={DOWNLOADS}", cache_dir=smollm2_cache).start()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("page_keys"), "model=tiny-random", "quant=fp16", "serve.session_len=256",
                  f"serve.api.keys=[{KEY}]").start()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--window-size=1280,900"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def js(d, script: str, *args):
    return d.execute_script(script, *args)


def wait(d, cond, timeout: float = 60, what: str = ""):
    return WebDriverWait(d, timeout, poll_frequency=0.02).until(lambda _: cond(), message=what)


def open_page(d, server, settings: dict | None = None, fresh: bool = True):
    d.get(server.url + "/")
    if fresh:
        js(d, "localStorage.clear(); sessionStorage.clear();")
        d.refresh()
    for k, v in (settings or {}).items():
        js(d, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
              "e.dispatchEvent(new Event('change'));", k, str(v))
    wait(d, lambda: js(d, "return document.getElementById('model').textContent") == server.health()["model"],
         10, "model name shown")


def send(d, text: str):
    js(d, "const i = document.getElementById('input'); i.value = arguments[0];"
          "document.getElementById('send').click();", text)


def idle(d) -> bool:
    return js(d, "return !document.getElementById('send').disabled && document.getElementById('stop').disabled")


def last_answer(d) -> str:
    return js(d, "const b = [...document.querySelectorAll('.msg.assistant .body')].pop(); return b ? b.textContent : null")


def observe(d):
    """Record the last answer's text at every DOM change of the log."""
    js(d, "window.__updates = []; new MutationObserver(() => { const b = [...document.querySelectorAll("
          "'.msg.assistant .body')].pop(); if (b) window.__updates.push(b.textContent); })"
          ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});")


def stored(d) -> list:
    return json.loads(js(d, "return localStorage.getItem('llmp.chat.v1')") or "[]")


def test_streams_the_api_greedy_answer_and_survives_reload(browser, smol):
    d = browser
    open_page(d, smol, {"temperature": 0, "top_p": 1, "max_tokens": 40})
    info = js(d, "return document.getElementById('quant').textContent + ' | ' + "
                 "document.getElementById('serverinfo').textContent")
    assert info.startswith("fp16 | KV cache ") and "tokens" in info and "session 512" in info
    observe(d)
    q = "What is the capital of France?"
    send(d, q)
    wait(d, lambda: idle(d) and last_answer(d), 60, "answer finished")
    final = stored(d)[-1]["content"]
    partial = {u for u in js(d, "return window.__updates") if u and u != last_answer(d)}
    assert len(partial) >= 2, f"answer arrived in {len(partial)} partial DOM updates, want >= 2 (streaming)"
    api = httpx.post(smol.url + "/v1/chat/completions", timeout=60, json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": q}], "temperature": 0, "top_p": 1,
        "max_tokens": 40}).json()["choices"][0]["message"]["content"]
    assert final == api and "Paris" in api
    assert last_answer(d).strip() == api.strip()                 # plain text answer: shown as is
    rate = js(d, "return document.getElementById('rate').textContent")
    assert "tok/s" in rate and not rate.startswith("0 tokens")
    d.refresh()                                                  # the conversation survives a reload
    wait(d, lambda: len(js(d, "return document.querySelectorAll('.msg')")) == 2, 10, "messages restored")
    assert last_answer(d).strip() == api.strip()
    js(d, "document.getElementById('newchat').click()")
    assert js(d, "return document.querySelectorAll('.msg').length") == 0 and stored(d) == []


def test_stop_cancels_on_the_server_and_frees_kv_blocks(browser, smol, tmp_path_factory):
    d = browser
    shots = tmp_path_factory.getbasetemp() / "browser"              # kept with the session's temp folders
    h0 = smol.wait_idle(smol.health()["total_blocks"])
    open_page(d, smol, {"temperature": 0, "top_p": 1, "max_tokens": 400})
    send(d, "Write a long story about a dragon who learns to bake bread, with many details.")
    wait(d, lambda: len(last_answer(d) or "") > 60, 60, "answer streaming")
    busy = smol.health()
    assert busy["running"] == 1 and busy["free_blocks"] < h0["free_blocks"]
    shots.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(shots / "chat_desktop_mid_answer.png"))
    d.set_window_size(390, 844)                                  # phone width
    time.sleep(0.3)
    assert not idle(d), "the answer should still be streaming for the phone screenshot"
    d.save_screenshot(str(shots / "chat_phone_mid_answer.png"))
    overflow = js(d, "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"page scrolls sideways by {overflow} px at phone width"
    d.set_window_size(1280, 900)
    js(d, "document.getElementById('stop').click()")
    wait(d, lambda: idle(d), 10, "stopped")
    h = smol.wait_idle(h0["free_blocks"], timeout=10)            # KV blocks back where they were
    assert h["requests_cancelled"] == h0["requests_cancelled"] + 1
    assert stored(d)[-1]["note"] == "stopped" and len(stored(d)[-1]["content"]) > 60
    assert (shots / "chat_phone_mid_answer.png").stat().st_size > 5000


def test_too_long_prompt_shows_400_in_words(browser, smol):
    d = browser
    open_page(d, smol, {"max_tokens": 16})
    long = "tell me more about that. " * 150
    send(d, long)
    wait(d, lambda: js(d, "return !document.getElementById('error').hidden"), 30, "error shown")
    err = js(d, "return document.getElementById('error').textContent")
    assert err.startswith("Error 400 (bad request)") and "session_len is 512" in err
    assert js(d, "return document.getElementById('input').value") == long.strip()   # kept to edit and retry
    assert stored(d) == [] and smol.health()["running"] == 0


def stub_stream(d, events: list, done: bool = True):
    """Replace fetch of /v1/chat/completions by a stream of the given SSE data lines (a test double)."""
    js(d, """
      const events = arguments[0], done = arguments[1], real = window.fetch;
      window.fetch = (url, opts) => {
        if (!String(url).includes('/v1/chat/completions')) return real(url, opts);
        const enc = new TextEncoder();
        const body = new ReadableStream({ async start(c) {
          for (const e of events) { c.enqueue(enc.encode('data: ' + e + '\\n\\n')); await new Promise(r => setTimeout(r, 20)); }
          if (done) c.enqueue(enc.encode('data: [DONE]\\n\\n'));
          c.close();
        }});
        return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
      };""", events, done)


def chunk(text: str) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def test_model_output_is_text_never_html_or_script(browser, keyed):
    d = browser
    open_page(d, keyed)
    evil = ['Look: <img src=x onerror="window.__xss=1">', ' and <script>window.__xss=2</script>\n',
            '```html\n<script>window.__xss=3</script>\n', '```\n**bold** and `<b>code</b>` ',
            '<a href="javascript:window.__xss=4">link</a>']
    stub_stream(d, [chunk(t) for t in evil])
    send(d, "say something nasty")
    wait(d, lambda: idle(d) and stored(d) and not stored(d)[-1].get("pending"), 10, "stub answer done")
    shown = last_answer(d)
    assert '<img src=x onerror="window.__xss=1">' in shown and "<script>window.__xss=2</script>" in shown
    assert "<script>window.__xss=3</script>" in shown and '<a href="javascript:' in shown
    assert js(d, "return document.querySelectorAll('#log img, #log script, #log a, #log iframe').length") == 0
    assert js(d, "return document.querySelector('#log strong').textContent") == "bold"
    assert js(d, "return document.querySelector('#log pre code').textContent") == "<script>window.__xss=3</script>"
    assert js(d, "return [...document.querySelectorAll('#log p code')].map(e => e.textContent)") == ["<b>code</b>"]
    time.sleep(0.3)
    assert js(d, "return window.__xss === undefined")


def test_dropped_connection_is_shown(browser, keyed):
    d = browser
    open_page(d, keyed)
    stub_stream(d, [chunk("half an ans"), chunk("wer")], done=False)   # the stream ends without [DONE]
    send(d, "hello")
    wait(d, lambda: js(d, "return !document.getElementById('error').hidden"), 10, "error shown")
    assert "connection to the server was lost" in js(d, "return document.getElementById('error').textContent")
    assert stored(d)[-1] == {"role": "assistant", "content": "half an answer", "note": "incomplete"}
    js(d, "window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")
    send(d, "again")
    wait(d, lambda: "Connection error" in js(d, "return document.getElementById('error').textContent"), 10)


def test_api_keys_401_shown_and_key_kept_in_session_only(browser, keyed):
    d = browser
    open_page(d, keyed, {"max_tokens": 8})
    send(d, "hi")
    wait(d, lambda: js(d, "return !document.getElementById('error').hidden"), 20, "401 shown")
    err = js(d, "return document.getElementById('error').textContent")
    assert err.startswith("Error 401 (unauthorized)") and "API key" in err
    assert js(d, "return !document.getElementById('keybox').hidden")
    for key, expect in (("sk-wrong", "incorrect API key"), (KEY, None)):
        js(d, "document.getElementById('apikey').value = arguments[0]; document.getElementById('savekey').click()", key)
        send(d, "hi")
        if expect:
            wait(d, lambda: expect in js(d, "return document.getElementById('error').textContent"), 20, expect)
        else:
            wait(d, lambda: idle(d) and len(stored(d)) == 2 and not stored(d)[-1].get("pending"), 30, "answer")
            assert js(d, "return document.getElementById('error').hidden")
            assert stored(d)[-1]["note"] == "stopped at max tokens"
    assert js(d, "return sessionStorage.getItem('llmp.apikey')") == KEY
    assert KEY not in json.dumps(js(d, "return Object.assign({}, localStorage)"))
