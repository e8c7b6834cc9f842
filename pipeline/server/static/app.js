// The chat page: plain JS over the server's own OpenAI-compatible API (/v1/chat/completions, SSE).
// Conversation and settings live in localStorage, the API key only in sessionStorage (this tab).
// Model output is only ever put in the DOM as text (textContent / text nodes): renderMarkdown builds
// elements itself, so nothing the model writes can become HTML or script.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "llmp.chat.v1", SETTINGS = "llmp.settings.v1", KEY = "llmp.apikey";
const state = { messages: [] };          // {role: "user"|"assistant", content, note?, pending?}
let modelName = null, controller = null;

// ------------------------------------------------------------------ safe Markdown (text nodes only)
const LIST = /^\s*([-*+]|\d+[.)])\s+/;

function renderMarkdown(text, el) {
  el.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {                                    // ``` code block (may be unclosed while streaming)
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++;
      const pre = document.createElement("pre"), c = document.createElement("code");
      if (fence[1]) c.dataset.lang = fence[1];
      c.textContent = code.join("\n");
      pre.appendChild(c);
      el.appendChild(pre);
      continue;
    }
    const h = line.match(/^(#{1,4})\s+(.*)$/);
    if (h) {
      const e = document.createElement("h" + h[1].length);
      inline(h[2], e);
      el.appendChild(e);
      i++;
      continue;
    }
    if (LIST.test(line)) {
      const list = document.createElement(/^\s*\d/.test(line) ? "ol" : "ul");
      for (; i < lines.length && LIST.test(lines[i]); i++) {
        const li = document.createElement("li");
        inline(lines[i].replace(LIST, ""), li);
        list.appendChild(li);
      }
      el.appendChild(list);
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*```/.test(lines[i]) && !/^#{1,4}\s/.test(lines[i]) &&
           !LIST.test(lines[i])) para.push(lines[i++]);
    const p = document.createElement("p");
    inline(para.join("\n"), p);
    el.appendChild(p);
  }
}

function inline(text, parent) {                     // `code`, **bold**, *italic*; the rest as text
  const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*)/g;
  let last = 0, m;
  while ((m = re.exec(text))) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    const t = m[0], tag = t[0] === "`" ? "code" : t[1] === "*" ? "strong" : "em";
    const e = document.createElement(tag);
    e.textContent = tag === "strong" ? t.slice(2, -2) : t.slice(1, -1);
    parent.appendChild(e);
    last = m.index + t.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

// ------------------------------------------------------------------ storage and rendering
function save() { localStorage.setItem(STORE, JSON.stringify(state.messages)); }

function load() {
  try { state.messages = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch { state.messages = []; }
  for (const m of state.messages) if (m.pending) { delete m.pending; m.note = "interrupted (page reloaded)"; }
  const s = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const k of ["temperature", "top_p", "max_tokens"]) if (s[k] !== undefined) $(k).value = s[k];
}

function bubble(m) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  const body = document.createElement("div");
  body.className = "body";
  const note = document.createElement("div");
  note.className = "note";
  div.append(body, note);
  div.update = () => {
    if (m.role === "assistant") renderMarkdown(m.content, body); else body.textContent = m.content;
    note.textContent = m.note || "";
    note.hidden = !m.note;
  };
  div.update();
  $("log").appendChild(div);
  return div;
}

function renderAll() {
  $("log").replaceChildren();
  state.messages.forEach(bubble);
  scrollDown();
}

function scrollDown() { const log = $("log"); log.scrollTop = log.scrollHeight; }

function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function hideError() { $("error").hidden = true; $("error").textContent = ""; }

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("newchat").disabled = busy;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// ------------------------------------------------------------------ server info
async function refreshInfo() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    modelName = h.model;
    $("model").textContent = h.model;
    $("quant").textContent = h.quant || h.weight_type;
    $("quant").title = `weights ${h.weight_type}, KV quant_policy ${h.quant_policy}`;
    $("serverinfo").textContent = `KV cache ${h.kv_capacity_tokens} tokens (${h.free_blocks}/${h.total_blocks} ` +
      `blocks free) · ${h.max_batch_size} sequences at once · session ${h.session_len} tokens · ${h.device}`;
    return true;
  } catch (e) {
    $("serverinfo").textContent = "server unreachable";
    return false;
  }
}

// ------------------------------------------------------------------ streaming chat
async function* sseData(resp) {
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let k;
    while ((k = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, k);
      buf = buf.slice(k + 2);
      for (const line of ev.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function httpError(resp) {
  let msg = resp.statusText;
  try { msg = (await resp.json()).error.message; } catch { /* not JSON */ }
  const what = { 400: "bad request", 401: "unauthorized", 404: "not found", 413: "too large" }[resp.status] || "error";
  if (resp.status === 401) {
    $("keybox").hidden = false;
    return `Error 401 (unauthorized): ${msg}. Enter a valid API key above.`;
  }
  return `Error ${resp.status} (${what}): ${msg}`;
}

function settings() {
  const s = { temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
              max_tokens: parseInt($("max_tokens").value, 10) };
  localStorage.setItem(SETTINGS, JSON.stringify(s));
  return s;
}

async function send(text) {
  hideError();
  if (!modelName && !(await refreshInfo())) { showError("Cannot reach the server: is it running?"); return; }
  const user = { role: "user", content: text };
  const msg = { role: "assistant", content: "", note: "", pending: true };
  const history = state.messages.filter((m) => !m.pending).map((m) => ({ role: m.role, content: m.content }));
  history.push(user);
  state.messages.push(user, msg);
  save();
  bubble(user);
  const view = bubble(msg);
  scrollDown();
  const body = { model: modelName, messages: history, stream: true,
                 stream_options: { include_usage: true, continuous_usage_stats: true }, ...settings() };
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, ntok = 0, done = false, reason = null;
  const rate = () => {
    const s = (performance.now() - (tFirst || t0)) / 1000;
    $("rate").textContent = `${ntok} tokens · ${s > 0 ? (ntok / s).toFixed(1) : "–"} tok/s` +
      (tFirst ? ` · first token after ${Math.round(tFirst - t0)} ms` : "");
  };
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                       body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) {                               // rejected: take the turn back, keep the text to retry
      state.messages.splice(state.messages.length - 2, 2);
      $("input").value = text;
      renderAll();
      showError(await httpError(resp));
      return;
    }
    for await (const data of sseData(resp)) {
      if (data === "[DONE]") { done = true; break; }
      const ev = JSON.parse(data);
      if (ev.error) throw new Error("the server failed while answering: " + ev.error.message);
      if (ev.usage) ntok = ev.usage.completion_tokens;
      for (const c of ev.choices || []) {
        if (c.delta && c.delta.content) {
          if (tFirst === null) tFirst = performance.now();
          msg.content += c.delta.content;
        }
        if (c.finish_reason) reason = c.finish_reason;
      }
      view.update();
      rate();
      scrollDown();
      save();
    }
    if (!done) throw new Error("the connection to the server was lost before the answer was complete");
    if (reason === "length") msg.note = "stopped at max tokens";
  } catch (e) {
    if (e.name === "AbortError") msg.note = "stopped";
    else {
      msg.note = "incomplete";
      const lost = e instanceof TypeError;        // fetch/read failed: network error, server gone
      showError(lost ? `Connection error: the connection to the server was lost (${e.message}).` : String(e.message));
    }
  } finally {
    delete msg.pending;
    view.update();
    save();
    setBusy(false);
    controller = null;
    refreshInfo();
  }
}

// ------------------------------------------------------------------ wiring
$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("newchat").addEventListener("click", () => {
  state.messages = [];
  save();
  renderAll();
  hideError();
  $("rate").textContent = "";
});
$("savekey").addEventListener("click", () => {
  sessionStorage.setItem(KEY, $("apikey").value.trim());
  $("apikey").value = "";
  $("keybox").hidden = true;
  hideError();
});
for (const k of ["temperature", "top_p", "max_tokens"]) $(k).addEventListener("change", settings);

window.renderMarkdown = renderMarkdown;            // for tests and the console
load();
renderAll();
refreshInfo();
setInterval(() => { if (!document.hidden) refreshInfo(); }, 2000);
