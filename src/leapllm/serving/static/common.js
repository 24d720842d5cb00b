// What the chat page and the dashboard share: requests to this server (with the API key, asked for
// once and kept in the browser), and Markdown turned into DOM nodes. No text from the user or the
// model is ever parsed as HTML: every piece of it goes into a text node.
"use strict";

const LeapLLM = (() => {
  const KEY_STORE = "leapllm.apiKey";

  function apiKey() {
    return localStorage.getItem(KEY_STORE) || "";
  }

  // The key dialog, built once per page.
  function keyDialog() {
    let dialog = document.getElementById("key-dialog");
    if (dialog) return dialog;
    dialog = document.body.appendChild(el("dialog"));
    dialog.id = "key-dialog";
    const form = dialog.appendChild(el("form"));
    form.method = "dialog";
    form.appendChild(el("p")).id = "key-message";
    const label = form.appendChild(el("label", "", "API key "));
    const input = label.appendChild(el("input"));
    Object.assign(input, { id: "key-input", type: "password", autocomplete: "off" });
    const menu = form.appendChild(el("menu"));
    for (const [value, text] of [["cancel", "Cancel"], ["save", "Save"]]) {
      const button = menu.appendChild(el("button", "", text));
      Object.assign(button, { value, type: "submit" });
    }
    return dialog;
  }

  // Ask for the key in the key dialog; resolves true once one is saved, false if cancelled.
  function askForKey(message) {
    const dialog = keyDialog();
    const input = document.getElementById("key-input");
    document.getElementById("key-message").textContent = message || "This server needs an API key.";
    input.value = apiKey();
    return new Promise((resolve) => {
      dialog.onclose = () => {
        if (dialog.returnValue === "save" && input.value.trim()) {
          localStorage.setItem(KEY_STORE, input.value.trim());
          resolve(true);
        } else {
          resolve(false);
        }
      };
      dialog.showModal();
      input.focus();
    });
  }

  // fetch() with the key; on 401, asks for the key and tries again until it works or is cancelled.
  async function api(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) return response;
      let detail = "";
      try { detail = (await response.json()).error.message; } catch (_) { /* not JSON */ }
      if (!(await askForKey(`The server refused the key: ${detail}`))) return response;
    }
  }

  // An OpenAI-style error body's message, or the status line.
  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    return `${response.status} ${response.statusText}`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- Markdown -> DOM ---------------------------------------------------------------------------
  // Code spans, bold, italics and http(s) links inside a line; everything else stays text.
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*][\s\S]*?)\*\*|\*([^*\s][^*]*?)\*|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function appendInline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (m[1] !== undefined) parent.append(el("code", "", m[2]));
      else if (m[3] !== undefined) appendInline(parent.appendChild(el("strong")), m[3]);
      else if (m[4] !== undefined) appendInline(parent.appendChild(el("em")), m[4]);
      else {
        const a = el("a", "", m[5]);
        a.href = m[6];
        a.rel = "noopener noreferrer";
        a.target = "_blank";
        parent.append(a);
      }
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+.-]*)/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;

  function cells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || ITEM.test(line) || QUOTE.test(line) || RULE.test(line) ||
      (line.includes("|") && next !== undefined && TABLE_SEP.test(next));
  }

  function renderMarkdown(text) {
    const frag = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(FENCE);
      if (fence) {  // a code block, closed by the same fence or by the end of the text (still streaming)
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        i++;
        const pre = el("pre");
        const code = el("code", fence[2] ? `language-${fence[2]}` : "", body.join("\n"));
        pre.append(code);
        frag.append(pre);
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const heading = line.match(HEADING);
      if (heading) {
        appendInline(frag.appendChild(el(`h${heading[1].length + 2 > 6 ? 6 : heading[1].length + 2}`)), heading[2]);
        i++;
        continue;
      }
      if (RULE.test(line)) { frag.append(el("hr")); i++; continue; }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const table = el("table");
        const head = table.appendChild(el("thead")).appendChild(el("tr"));
        for (const c of cells(line)) appendInline(head.appendChild(el("th")), c);
        const body = table.appendChild(el("tbody"));
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const row = body.appendChild(el("tr"));
          for (const c of cells(lines[i])) appendInline(row.appendChild(el("td")), c);
          i++;
        }
        frag.append(table);
        continue;
      }
      if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].match(QUOTE)[1]);
        frag.appendChild(el("blockquote")).append(renderMarkdown(quoted.join("\n")));
        continue;
      }
      const item = line.match(ITEM);
      if (item) {
        const ordered = /\d/.test(item[2]);
        const list = el(ordered ? "ol" : "ul");
        while (i < lines.length) {
          const m = lines[i].match(ITEM);
          if (!m || /\d/.test(m[2]) !== ordered) break;
          const li = list.appendChild(el("li"));
          appendInline(li, m[3]);
          i++;
          // continuation lines (indented, not a new item) belong to this item
          while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !ITEM.test(lines[i])) {
            li.append(" ");
            appendInline(li, lines[i++].trim());
          }
        }
        frag.append(list);
        continue;
      }
      const para = el("p");
      const body = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) body.push(lines[i++]);
      body.forEach((l, j) => {
        if (j) para.append(el("br"));
        appendInline(para, l);
      });
      frag.append(para);
    }
    return frag;
  }

  function wireKeyButton() {
    const button = document.getElementById("key-button");
    if (button) button.addEventListener("click", () => askForKey("The API key this page sends."));
  }

  return { api, apiKey, askForKey, errorText, el, renderMarkdown, wireKeyButton };
})();
