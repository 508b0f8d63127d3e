// Runs the provenance page's script in Node against a minimal DOM and canned HTTP answers (no browser).
//
// Usage: node page_harness.js PAGE.html SCENARIO.json  ->  prints a JSON report on stdout.
// SCENARIO: {"responses": {"<path>": {"status", "body"}}, "select": id, "mode": "chat"|"completion",
//            "prompt", "system", "max_tokens", "temperature", "api_key", "chunk_bytes"}.
// The report: the requests the page sent, the output spans (role, text, index), the legend, tooltip,
// error and status texts, and the model cards.
"use strict";
const fs = require("fs");
const vm = require("vm");

const [pagePath, scenarioPath] = process.argv.slice(2);
const html = fs.readFileSync(pagePath, "utf8");
const scenario = JSON.parse(fs.readFileSync(scenarioPath, "utf8"));

class Text {
  constructor(text) { this.nodeType = 3; this.data = String(text); this.parentNode = null; }
  get textContent() { return this.data; }
}

class Element {
  constructor(tag, attrs) {
    this.nodeType = 1;
    this.tagName = tag.toUpperCase();
    this.childNodes = [];
    this.parentNode = null;
    this.attributes = {};
    this.listeners = {};
    this.style = {};
    this.disabled = false;
    this._classes = new Set();
    this._value = undefined;
    this.checked = false;
    for (const [k, v] of Object.entries(attrs || {})) this.setAttribute(k, v);
  }
  setAttribute(name, value) {
    value = String(value);
    if (name === "class") { this.className = value; return; }
    if (name === "checked") { this.checked = true; return; }
    if (name === "value") { this._value = value; return; }
    this.attributes[name] = value;
  }
  getAttribute(name) { return name in this.attributes ? this.attributes[name] : null; }
  get className() { return [...this._classes].join(" "); }
  set className(v) { this._classes = new Set(String(v).split(/\s+/).filter(Boolean)); }
  get classList() {
    const set = this._classes;
    return {
      add: (c) => set.add(c), remove: (c) => set.delete(c), contains: (c) => set.has(c),
      toggle: (c, force) => { const on = force === undefined ? !set.has(c) : force; if (on) set.add(c); else set.delete(c); return on; },
    };
  }
  get dataset() {
    const out = {};
    for (const [k, v] of Object.entries(this.attributes)) {
      if (k.startsWith("data-")) out[k.slice(5).replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = v;
    }
    return out;
  }
  get children() { return this.childNodes.filter((n) => n.nodeType === 1); }
  appendChild(node) {
    if (node.parentNode) node.parentNode.childNodes.splice(node.parentNode.childNodes.indexOf(node), 1);
    node.parentNode = this;
    this.childNodes.push(node);
    return node;
  }
  append(...nodes) { for (const n of nodes) this.appendChild(typeof n === "string" ? new Text(n) : n); }
  replaceChildren(...nodes) { for (const n of this.childNodes) n.parentNode = null; this.childNodes = []; this.append(...nodes); }
  get textContent() { return this.childNodes.map((n) => n.textContent).join(""); }
  set textContent(v) { this.replaceChildren(new Text(v)); }
  descendants() { return this.children.flatMap((c) => [c, ...c.descendants()]); }
  get value() {
    if (this.tagName !== "SELECT") return this._value === undefined ? "" : this._value;
    const options = this.descendants().filter((n) => n.tagName === "OPTION");
    const hit = options.find((o) => o.value === this._value);
    return hit ? hit.value : options.length ? options[0].value : "";
  }
  set value(v) { this._value = String(v); }
  get offsetWidth() { return 200; }
  get offsetHeight() { return 60; }
  getBoundingClientRect() { return { left: 10, top: 10, right: 110, bottom: 30, width: 100, height: 20 }; }
  addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
  dispatch(type, event) {
    event = Object.assign({ type, target: this, preventDefault() {}, clientX: 50, clientY: 50 }, event || {});
    const results = [];
    for (let node = event.target; node; node = node.parentNode) {
      for (const fn of node.listeners[type] || []) results.push(fn(event));
    }
    return Promise.all(results);
  }
}

// Every element with an id in the page, with the attributes the script reads (value, checked, type).
const byId = {};
for (const m of html.matchAll(/<([a-zA-Z0-9]+)\s([^>]*\bid="([^"]+)"[^>]*)>/g)) {
  const attrs = {};
  for (const a of m[2].matchAll(/([a-zA-Z-]+)(?:="([^"]*)")?/g)) attrs[a[1]] = a[2] === undefined ? "" : a[2];
  delete attrs.id;
  byId[m[3]] = new Element(m[1], attrs);
}
const document = {
  baseURI: "http://alignd.test/",
  getElementById: (id) => byId[id] || null,
  createElement: (tag) => new Element(tag),
  createTextNode: (text) => new Text(text),
};
const storage = {};
const requests = [];

function answer(path) {
  const canned = scenario.responses[path];
  if (!canned) return new Response(JSON.stringify({ error: { message: "no route " + path, type: "x", param: null, code: null } }), { status: 404 });
  const bytes = new TextEncoder().encode(canned.body);
  const size = scenario.chunk_bytes || bytes.length || 1;
  const stream = new ReadableStream({
    start(controller) {
      // Odd chunk sizes split SSE events and UTF-8 characters across reads, as a network does.
      for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
      controller.close();
    },
  });
  return new Response(stream, { status: canned.status, headers: { "content-type": canned.content_type || "application/json" } });
}

async function fakeFetch(url, init) {
  init = init || {};
  const path = new URL(url).pathname;
  requests.push({ path, method: init.method || "GET", headers: init.headers || {}, body: init.body ? JSON.parse(init.body) : null });
  return answer(path);
}

const context = vm.createContext({
  document, window: { innerWidth: 1200, innerHeight: 800 }, sessionStorage: {
    getItem: (k) => (k in storage ? storage[k] : null), setItem: (k, v) => { storage[k] = String(v); },
  },
  fetch: fakeFetch, URL, TextDecoder, TextEncoder, AbortController, performance, console, setTimeout, Promise,
});
const script = html.match(/<script>([\s\S]*?)<\/script>/)[1];

const settle = () => new Promise((resolve) => setTimeout(resolve, 20));

(async () => {
  byId["api-key"].value = scenario.api_key || "";
  vm.runInContext(script, context, { filename: "index.html.js" });
  await settle();  // loadModels()
  const report = { cards: byId.models.children.map((c) => ({ id: c.dataset.id, kind: c.dataset.kind, text: c.textContent })) };
  report.error_after_load = byId.error.classList.contains("shown") ? byId.error.textContent : null;
  if (scenario.select) {
    byId.model.value = scenario.select;
    await byId.model.dispatch("change");
  }
  report.mode_after_select = byId["mode-completion"].checked ? "completion" : "chat";
  if (scenario.mode) {
    byId["mode-chat"].checked = scenario.mode === "chat";
    byId["mode-completion"].checked = scenario.mode === "completion";
  }
  byId.prompt.value = scenario.prompt || "";
  byId.system.value = scenario.system || "";
  if (scenario.max_tokens !== undefined) byId["max-tokens"].value = String(scenario.max_tokens);
  if (scenario.temperature !== undefined) byId.temperature.value = String(scenario.temperature);
  await byId.form.dispatch("submit");
  await settle();
  const spans = byId.output.children;
  report.spans = spans.map((s) => ({ role: s.getAttribute("data-role"), text: s.textContent, index: s.dataset.span }));
  report.output_text = byId.output.textContent;
  report.legend = byId.legend.textContent;
  report.legend_roles = byId.legend.descendants().filter((n) => n.getAttribute("data-role")).map((n) => n.getAttribute("data-role"));
  report.error = byId.error.classList.contains("shown") ? byId.error.textContent : null;
  report.status = byId.status.textContent;
  report.send_disabled = byId.send.disabled;
  if (spans.length) {
    await byId.output.dispatch("mouseover", { target: spans[spans.length - 1] });
    report.tooltip = byId.tooltip.textContent;
    report.tooltip_display = byId.tooltip.style.display;
  }
  report.requests = requests;
  process.stdout.write(JSON.stringify(report));
})().catch((err) => { console.error(err && err.stack ? err.stack : err); process.exit(1); });
