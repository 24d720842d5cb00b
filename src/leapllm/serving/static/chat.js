// The chat page: a conversation kept in the browser, streamed from /v1/chat/completions.
"use strict";

(() => {
  const { api, errorText, el, renderMarkdown } = LeapLLM;
  const CHAT_STORE = "leapllm.chat";
  const SETTINGS_STORE = "leapllm.settings";
  const FIELDS = ["system-prompt", "temperature", "top-p", "top-k", "min-p", "max-tokens", "seed", "stop", "json-schema"];
  const $ = (id) => document.getElementById(id);

  let messages = loadJson(CHAT_STORE, []);  // [{role, content, stats?, stopped?, error?}]
  let modelName = null;
  let controller = null;  // the AbortController of the reply being streamed

  function loadJson(key, fallback) {
    try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch (_) { return fallback; }
  }

  function save() {
    localStorage.setItem(CHAT_STORE, JSON.stringify(messages));
  }

  function saveSettings() {
    const values = {};
    for (const id of FIELDS) values[id] = $(id).value;
    localStorage.setItem(SETTINGS_STORE, JSON.stringify(values));
  }

  function loadSettings() {
    const values = loadJson(SETTINGS_STORE, {});
    for (const id of FIELDS) if (typeof values[id] === "string") $(id).value = values[id];
  }

  // -- rendering ---------------------------------------------------------------------------------
  function statsLine(stats) {
    const parts = [];
    if (stats.ttft_ms !== undefined) parts.push(`TTFT ${stats.ttft_ms.toFixed(0)} ms`);
    if (stats.tokens_per_s !== undefined) parts.push(`${stats.tokens_per_s.toFixed(1)} tok/s`);
    if (stats.tokens !== undefined) parts.push(`${stats.tokens} tokens`);
    if (stats.finish_reason) parts.push(`finish: ${stats.finish_reason}`);
    return parts.join(" · ");
  }

  function messageNode(message) {
    const node = el("article", `message ${message.role}`);
    node.append(el("div", "role", message.role));
    const body = node.appendChild(el("div", "content"));
    if (message.role === "assistant") body.append(renderMarkdown(message.content));
    else body.textContent = message.content;
    if (message.error) node.append(el("p", "error", message.error));
    const footer = [message.stats ? statsLine(message.stats) : "", message.stopped ? "stopped" : ""].filter(Boolean);
    if (footer.length) node.append(el("div", "stats", footer.join(" · ")));
    return node;
  }

  function render() {
    const box = $("messages");
    box.replaceChildren(...messages.map(messageNode));
    box.scrollTop = box.scrollHeight;
  }

  function renderLast() {
    const box = $("messages");
    const last = box.lastElementChild;
    const node = messageNode(messages[messages.length - 1]);
    if (last) last.replaceWith(node); else box.append(node);
    box.scrollTop = box.scrollHeight;
  }

  // -- the request -------------------------------------------------------------------------------
  function numberField(id, parse) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    const value = parse(raw);
    if (!Number.isFinite(value)) throw new Error(`${id.replace("-", " ")} must be a number`);
    return value;
  }

  function requestBody() {
    const body = { model: modelName, stream: true, stream_options: { include_usage: true } };
    const chat = [];
    const system = $("system-prompt").value.trim();
    if (system) chat.push({ role: "system", content: system });
    for (const m of messages) if (!m.error || m.content) chat.push({ role: m.role, content: m.content });
    body.messages = chat;
    const fields = { temperature: ["temperature", parseFloat], top_p: ["top-p", parseFloat], top_k: ["top-k", Number],
                     min_p: ["min-p", parseFloat], max_tokens: ["max-tokens", Number], seed: ["seed", Number] };
    for (const [name, [id, parse]] of Object.entries(fields)) {
      const value = numberField(id, parse);
      if (value !== undefined) body[name] = value;
    }
    const stops = $("stop").value.split("\n").filter((s) => s.length);
    if (stops.length) body.stop = stops;
    const schema = $("json-schema").value.trim();
    if (schema) {
      let parsed;
      try { parsed = JSON.parse(schema); } catch (e) { throw new Error(`the JSON schema is not JSON: ${e.message}`); }
      body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
    }
    return body;
  }

  // Server-sent events of one response: yields each `data:` payload, parsed, until [DONE].
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function send(text) {
    let body;
    try {
      messages.push({ role: "user", content: text });
      body = requestBody();
      $("settings-error").textContent = "";
    } catch (e) {
      messages.pop();
      $("settings-error").textContent = e.message;
      return;
    }
    const reply = { role: "assistant", content: "", stats: {} };
    messages.push(reply);
    save();
    render();
    setBusy(true);
    controller = new AbortController();
    const started = performance.now();
    let first = null, chunks = 0, painted = 0;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          if (first === null) {
            first = performance.now();
            reply.stats.ttft_ms = first - started;
          }
          reply.content += choice.delta.content;
          chunks++;
        }
        if (choice && choice.finish_reason) reply.stats.finish_reason = choice.finish_reason;
        if (chunk.usage) reply.stats.tokens = chunk.usage.completion_tokens;
        if (performance.now() - painted > 50) {  // repaint at most 20 times a second
          renderLast();
          painted = performance.now();
        }
      }
    } catch (e) {
      if (e.name === "AbortError") reply.stopped = true;
      else reply.error = e.message;
    } finally {
      const tokens = reply.stats.tokens ?? chunks;
      if (reply.stats.tokens === undefined && chunks) reply.stats.tokens = chunks;
      if (first !== null && tokens > 1) reply.stats.tokens_per_s = (tokens - 1) / ((performance.now() - first) / 1000);
      controller = null;
      setBusy(false);
      save();
      renderLast();
    }
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop-button").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  async function loadModel() {
    try {
      const response = await api("/v1/models");
      if (!response.ok) throw new Error(await errorText(response));
      modelName = (await response.json()).data[0].id;
      $("model-name").textContent = modelName;
    } catch (e) {
      $("model-name").textContent = `no model: ${e.message}`;
    }
  }

  function start() {
    LeapLLM.wireKeyButton();
    loadSettings();
    for (const id of FIELDS) $(id).addEventListener("change", saveSettings);
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value;
      if (!text.trim() || controller) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop-button").addEventListener("click", () => controller && controller.abort());
    $("new-chat").addEventListener("click", () => {
      if (controller) controller.abort();
      messages = [];
      save();
      render();
    });
    render();
    loadModel();
  }

  start();
})();
