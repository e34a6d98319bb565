// The batchd web console: one page, hash routing, no framework, no build step.
//
// The page holds no data of its own: it asks for an API key once per tab (kept in
// sessionStorage only, never in a URL, localStorage or a cookie), sends it as
// "Authorization: Bearer" on every call, and reads /console/api/*. Downloads and cancels go
// through the surfaces' own endpoints, so the console can do nothing the key could not do
// through the SDKs. Every piece of data reaches the DOM through textContent or attributes
// (never innerHTML), and the page runs under a CSP without inline scripts or styles.
"use strict";

(() => {
  const KEY_NAME = "batchd.console.key";
  const STATUSES = [
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
    "completed",
    "failed",
    "expired",
    "cancelled",
  ];
  const FILTERS = [
    ["", "all"],
    ["validating,in_progress,finalizing,cancelling", "active"],
    ["completed,failed,expired,cancelled", "ended"],
    ...STATUSES.map((status) => [status, status]),
  ];
  const LIST_POLL_MS = 2000;
  const BATCH_POLL_MS = 1000;
  const USAGE_POLL_MS = 10000;
  const ENGINES_POLL_MS = 5000;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    me: null,
    generation: 0, // bumped on every navigation: a stale poll sees it and stops
    timer: null,
    errorSource: null,
    list: { filter: "", allTenants: false, cursors: [] },
    usageDays: 14,
  };

  // ---------------------------------------------------------------- DOM helpers

  const $ = (id) => document.getElementById(id);

  // el("td", {className: "x", text: "y", dataset: {a: "b"}, on: {click: f}}, child, ...)
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    applyProps(node, props);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, String(value));
    }
    append(node, children);
    return node;
  }

  function applyProps(node, props) {
    if (!props) return;
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "className") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "on") {
        for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
      } else if (name === "attrs") {
        for (const [attr, attrValue] of Object.entries(value)) node.setAttribute(attr, String(attrValue));
      } else node[name] = value;
    }
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function table(id, className, headers, rows, footRows) {
    const thead = el("thead", null, el("tr", null, headers.map((h) => el("th", headerProps(h)))));
    const tbody = el("tbody", null, rows);
    const tfoot = footRows && footRows.length ? el("tfoot", null, footRows) : null;
    return el("div", { className: "table-wrap" }, el("table", { id, className }, thead, tbody, tfoot));
  }

  function headerProps(header) {
    return typeof header === "string" ? { text: header } : header;
  }

  function cell(value, className) {
    return el("td", { className }, value);
  }

  function num(value) {
    return el("td", { className: "num" }, value);
  }

  function section(title, ...children) {
    return el("section", { className: "card" }, el("h2", { text: title }), children);
  }

  function empty(text) {
    return el("p", { className: "empty", text });
  }

  // ---------------------------------------------------------------- formatting

  function fmtInt(value) {
    return value === null || value === undefined ? "—" : Number(value).toLocaleString();
  }

  function fmtTime(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    return new Date(seconds * 1000).toLocaleString();
  }

  function fmtShortTime(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    let s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    const days = Math.floor(s / 86400);
    s -= days * 86400;
    const hours = Math.floor(s / 3600);
    s -= hours * 3600;
    const minutes = Math.floor(s / 60);
    s -= minutes * 60;
    if (days) return `${days}d ${hours}h`;
    if (hours) return `${hours}h ${minutes}m`;
    return `${minutes}m ${s}s`;
  }

  function fmtMoney(amount, currency) {
    if (amount === null || amount === undefined) return "—";
    const value = Number(amount);
    const digits = value !== 0 && Math.abs(value) < 0.01 ? 6 : 2;
    return `${value.toFixed(digits)} ${currency || ""}`.trim();
  }

  function fmtPercent(value) {
    return `${Number(value || 0).toFixed(1)}%`;
  }

  function fmtRate(value) {
    return value ? `${Number(value).toFixed(1)}` : "—";
  }

  function tenantName(tenant) {
    // Keys-file tenants are stored as "t_<name>"; /console/api/me names them without it.
    return typeof tenant === "string" && tenant.startsWith("t_") ? tenant.slice(2) : tenant;
  }

  function badge(status, id) {
    return el("span", { id, className: `badge status-${status}`, text: status });
  }

  function progressBar(progress) {
    const fraction = Math.max(0, Math.min(1, Number(progress.fraction) || 0));
    const fill = el("div", { className: "bar-fill" });
    fill.style.width = `${(fraction * 100).toFixed(1)}%`;
    return el(
      "div",
      { className: "progress" },
      el("div", { className: "bar", attrs: { role: "progressbar", "aria-valuemin": 0, "aria-valuemax": progress.total, "aria-valuenow": progress.done } }, fill),
      el("span", { className: "progress-text", text: `${fmtInt(progress.done)}/${fmtInt(progress.total)}` }),
    );
  }

  // ---------------------------------------------------------------- errors

  function showError(message, source) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
    state.errorSource = source || null;
  }

  function clearError(source) {
    if (source && state.errorSource !== source) return;
    const box = $("error");
    box.textContent = "";
    box.hidden = true;
    state.errorSource = null;
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function storedKey() {
    return sessionStorage.getItem(KEY_NAME);
  }

  function authHeaders(key, extra) {
    return { Authorization: `Bearer ${key}`, ...(extra || {}) };
  }

  async function errorMessage(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      // not JSON: keep the status line
    }
    return message;
  }

  // A request with the session's key (or `key`, when logging in). A 401 ends the session.
  async function request(path, options) {
    const opts = options || {};
    const key = opts.key || storedKey();
    if (!key) throw new ApiError(401, "Not logged in.");
    let response;
    try {
      response = await fetch(path, {
        method: opts.method || "GET",
        headers: authHeaders(key, opts.headers),
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (err) {
      throw new ApiError(0, `Cannot reach the server: ${err.message}`);
    }
    if (!response.ok) {
      const error = new ApiError(response.status, await errorMessage(response));
      if (response.status === 401 && !opts.key) sessionExpired(error.message);
      throw error;
    }
    return response;
  }

  async function getJSON(path, options) {
    const response = await request(path, options);
    return response.json();
  }

  function query(params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
    }
    const text = search.toString();
    return text ? `?${text}` : "";
  }

  // ---------------------------------------------------------------- session

  function sessionExpired(message) {
    sessionStorage.removeItem(KEY_NAME);
    state.me = null;
    stopPolling();
    showLogin();
    showError(`${message} Log in again.`, "session");
  }

  function showLogin() {
    $("login-view").hidden = false;
    $("view").hidden = true;
    $("view").replaceChildren();
    $("nav").hidden = true;
    $("session").hidden = true;
    $("api-key").value = "";
    $("api-key").focus();
  }

  function showApp() {
    $("login-view").hidden = true;
    $("view").hidden = false;
    $("nav").hidden = false;
    $("session").hidden = false;
    $("nav-engines").hidden = !state.me.admin;
    $("whoami").textContent = `${state.me.tenant}${state.me.admin ? " (admin)" : ""}`;
  }

  async function login(event) {
    event.preventDefault();
    const input = $("api-key");
    const key = input.value.trim();
    if (!key) {
      showError("Enter an API key.", "login");
      return;
    }
    if (!/^[\x21-\x7e]+$/.test(key)) {
      showError("An API key is printable ASCII without spaces.", "login");
      return;
    }
    const button = $("login");
    button.disabled = true;
    try {
      const me = await getJSON("/console/api/me", { key });
      sessionStorage.setItem(KEY_NAME, key);
      input.value = "";
      state.me = me;
      clearError();
      showApp();
      route();
    } catch (err) {
      showError(err.status === 401 ? `Login failed: ${err.message}` : err.message, "login");
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  function logout() {
    sessionStorage.removeItem(KEY_NAME);
    state.me = null;
    state.list = { filter: "", allTenants: false, cursors: [] };
    stopPolling();
    clearError();
    showLogin();
  }

  async function start() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("error").addEventListener("click", () => clearError());
    window.addEventListener("hashchange", () => {
      if (state.me) route();
    });
    if (!storedKey()) {
      showLogin();
      return;
    }
    try {
      state.me = await getJSON("/console/api/me");
      showApp();
      route();
    } catch (err) {
      if (err.status !== 401) {
        showLogin();
        showError(err.message, "session");
      }
    }
  }

  // ---------------------------------------------------------------- routing and polling

  function stopPolling() {
    state.generation += 1;
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
  }

  // Runs `refresh` now and then every `interval` ms while the view is open; `refresh`
  // returns false to stop (e.g. the batch has ended).
  function poll(refresh, interval, source) {
    const generation = state.generation;
    const tick = async () => {
      if (generation !== state.generation) return;
      let again = true;
      try {
        again = (await refresh(() => generation === state.generation)) !== false;
        if (generation === state.generation) clearError(source);
      } catch (err) {
        if (generation !== state.generation) return;
        if (err.status !== 401) showError(err.message, source);
        // No key, no access, nothing there: asking again would only repeat the answer.
        if (err.status === 401 || err.status === 403 || err.status === 404) again = false;
      }
      if (again && generation === state.generation) state.timer = setTimeout(tick, interval);
    };
    tick();
  }

  function route() {
    stopPolling();
    if (state.errorSource !== "session" && state.errorSource !== "login") clearError();
    const hash = location.hash || "#/batches";
    const view = $("view");
    view.replaceChildren();
    let active = "nav-batches";
    const batchMatch = hash.match(/^#\/batch\/(.+)$/);
    if (batchMatch) {
      renderBatch(view, decodeURIComponent(batchMatch[1]));
    } else if (hash === "#/usage") {
      active = "nav-usage";
      renderUsage(view);
    } else if (hash === "#/engines" && state.me.admin) {
      active = "nav-engines";
      renderEngines(view);
    } else {
      renderBatches(view);
    }
    for (const id of ["nav-batches", "nav-usage", "nav-engines"]) {
      $(id).classList.toggle("active", id === active);
    }
  }

  // ---------------------------------------------------------------- batches list

  function renderBatches(view) {
    const list = state.list;
    const filter = el(
      "select",
      { id: "status-filter", on: { change: () => { list.filter = filter.value; list.cursors = []; refreshNow(); } } },
      FILTERS.map(([value, label]) => el("option", { value, text: label })),
    );
    filter.value = list.filter;
    const controls = el(
      "div",
      { className: "controls" },
      el("label", { className: "control" }, "Status ", filter),
    );
    if (state.me.admin) {
      const allTenants = el("input", {
        id: "all-tenants",
        type: "checkbox",
        checked: list.allTenants,
        on: { change: () => { list.allTenants = allTenants.checked; list.cursors = []; refreshNow(); } },
      });
      controls.append(el("label", { className: "control" }, allTenants, " All tenants"));
    }
    const newer = el("button", { id: "page-newer", type: "button", className: "button", text: "← Newer", on: { click: () => { list.cursors.pop(); refreshNow(); } } });
    const older = el("button", { id: "page-older", type: "button", className: "button", text: "Older →" });
    const holder = el("div", { id: "batches-holder" });
    const summary = el("p", { className: "muted", id: "batches-summary" });
    view.append(
      el("div", { className: "page-head" }, el("h1", { text: "Batches" }), controls),
      holder,
      el("div", { className: "pager" }, summary, newer, older),
    );

    function refreshNow() {
      stopPolling();
      poll(refresh, LIST_POLL_MS, "batches");
    }

    async function refresh(current) {
      const after = list.cursors.length ? list.cursors[list.cursors.length - 1] : undefined;
      const page = await getJSON(
        "/console/api/batches" +
          query({ status: list.filter, limit: 50, after, all_tenants: state.me.admin && list.allTenants ? "true" : undefined }),
      );
      if (!current()) return false;
      holder.replaceChildren(batchesTable(page.data, state.me.admin && list.allTenants));
      newer.hidden = list.cursors.length === 0;
      older.hidden = !page.has_more;
      older.onclick = () => {
        if (page.data.length) {
          list.cursors.push(page.data[page.data.length - 1].id);
          refreshNow();
        }
      };
      summary.textContent = page.data.length
        ? `${page.data.length} batch${page.data.length === 1 ? "" : "es"} shown · updated ${new Date().toLocaleTimeString()}`
        : "";
      return true;
    }

    refreshNow();
  }

  function batchesTable(batches, withTenant) {
    const headers = [
      "ID / model",
      ...(withTenant ? ["Tenant"] : []),
      "Surface",
      "Status",
      "Progress",
      { text: "Output tok/s", className: "num" },
      { text: "Time left", className: "num" },
      { text: "Window left", className: "num" },
      { text: "Cost (batch)", className: "num" },
      { text: "Saving", className: "num" },
      "Created",
    ];
    const rows = batches.map((batch) =>
      el(
        "tr",
        { dataset: { batchId: batch.id } },
        el(
          "td",
          { className: "id" },
          el("a", { href: `#/batch/${encodeURIComponent(batch.id)}`, text: batch.id }),
          el("div", { className: "sub model", title: batch.model || "", text: batch.model || "—" }),
        ),
        withTenant ? cell(tenantName(batch.tenant), "tenant") : null,
        cell(batch.surface, "surface"),
        el("td", { className: "status" }, badge(batch.status)),
        cell(progressBar(batch.progress), "progress-cell"),
        num(fmtRate(batch.progress.output_tokens_per_second)),
        num(batch.ended ? "—" : fmtDuration(batch.progress.eta_seconds)),
        num(batch.ended ? "—" : fmtDuration(batch.progress.window_left_seconds)),
        num(fmtMoney(batch.cost.batch, batch.cost.currency)),
        savingCell(batch.cost),
        cell(fmtShortTime(batch.created_at), "time"),
      ),
    );
    const wrap = table("batches-table", "data", headers, rows);
    if (!batches.length) wrap.append(empty("No batches yet. Submit one with the OpenAI or Anthropic SDK; it appears here."));
    return wrap;
  }

  function savingCell(cost) {
    if (!cost.realtime) return num("—");
    return el(
      "td",
      { className: "num saving-cell" },
      el("div", { text: fmtMoney(cost.saving, cost.currency) }),
      el("div", { className: "sub", text: fmtPercent(cost.saving_percent) }),
    );
  }

  // ---------------------------------------------------------------- one batch

  function renderBatch(view, batchId) {
    const status = badge("…", "batch-status");
    const actions = el("div", { className: "actions", id: "batch-actions" });
    const body = el("div", { className: "grid" });
    view.append(
      el("p", { className: "crumbs" }, el("a", { href: "#/batches", text: "← Batches" })),
      el("div", { className: "page-head" }, el("h1", { className: "mono", text: batchId }), status, actions),
      body,
    );
    let actionsKey = null;

    async function refresh(current) {
      const batch = await getJSON(`/console/api/batches/${encodeURIComponent(batchId)}`);
      if (!current()) return false;
      status.textContent = batch.status;
      status.className = `badge status-${batch.status}`;
      const key = [batch.status, batch.ended, batch.output_file_id, batch.error_file_id].join("|");
      if (key !== actionsKey) {
        actionsKey = key;
        actions.replaceChildren(...batchActions(batch, () => poll(refresh, BATCH_POLL_MS, "batch")));
      }
      body.replaceChildren(...batchSections(batch));
      return !batch.ended;
    }

    poll(refresh, BATCH_POLL_MS, "batch");
  }

  function batchActions(batch, reload) {
    const own = state.me && tenantName(batch.tenant) === state.me.tenant;
    const buttons = [];
    if (!own) {
      buttons.push(el("span", { className: "muted", text: `Tenant ${tenantName(batch.tenant)}'s batch: only its keys can download or cancel it.` }));
      return buttons;
    }
    if (batch.surface === "anthropic") {
      if (batch.ended) {
        buttons.push(
          downloadButton("download-output", "Download results", `/v1/messages/batches/${encodeURIComponent(batch.id)}/results`, `${batch.id}_results.jsonl`),
        );
      }
    } else {
      if (batch.output_file_id) {
        buttons.push(
          downloadButton("download-output", "Download output", `/v1/files/${encodeURIComponent(batch.output_file_id)}/content`, `${batch.id}_output.jsonl`),
        );
      }
      if (batch.error_file_id) {
        buttons.push(
          downloadButton("download-errors", "Download errors", `/v1/files/${encodeURIComponent(batch.error_file_id)}/content`, `${batch.id}_errors.jsonl`),
        );
      }
    }
    if (!batch.ended && batch.status !== "cancelling") {
      const path =
        batch.surface === "anthropic"
          ? `/v1/messages/batches/${encodeURIComponent(batch.id)}/cancel`
          : `/v1/batches/${encodeURIComponent(batch.id)}/cancel`;
      const cancel = el("button", { id: "cancel-batch", type: "button", className: "button button-danger", text: "Cancel batch" });
      cancel.addEventListener("click", async () => {
        if (!window.confirm(`Cancel batch ${batch.id}? Requests not yet run will not run.`)) return;
        cancel.disabled = true;
        try {
          await request(path, { method: "POST", headers: { "x-api-key": storedKey() } });
          stopPolling();
          reload();
        } catch (err) {
          cancel.disabled = false;
          if (err.status !== 401) showError(`Cancel failed: ${err.message}`, "action");
        }
      });
      buttons.push(cancel);
    }
    return buttons;
  }

  function downloadButton(id, label, path, filename) {
    const button = el("button", { id, type: "button", className: "button", text: label });
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const response = await request(path, { headers: { "x-api-key": storedKey() } });
        const blob = await response.blob();
        const url = URL.createObjectURL(blob);
        const link = el("a", { href: url, download: filename, hidden: true });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } catch (err) {
        if (err.status !== 401) showError(`Download failed: ${err.message}`, "action");
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  function definitionList(pairs, id) {
    return el(
      "dl",
      { className: "facts", id },
      pairs.filter(Boolean).map(([term, value]) => [el("dt", { text: term }), el("dd", null, value)]),
    );
  }

  function batchSections(batch) {
    const counts = batch.request_counts;
    const usage = batch.usage;
    const cost = batch.cost;
    const progress = batch.progress;
    const metadata = batch.metadata && Object.keys(batch.metadata).length
      ? Object.entries(batch.metadata).map(([k, v]) => `${k}=${v}`).join(", ")
      : null;

    const overview = section(
      "Overview",
      definitionList([
        ["Surface", batch.surface],
        ["Tenant", tenantName(batch.tenant)],
        ["Model", batch.model || "—"],
        ["Endpoint", batch.endpoint || "—"],
        ["Window", batch.completion_window],
        ["Created", fmtTime(batch.created_at)],
        ["Expires", fmtTime(batch.expires_at)],
        ["Input file", batch.input_file_id || "—"],
        batch.output_file_id ? ["Output file", batch.output_file_id] : null,
        batch.error_file_id ? ["Error file", batch.error_file_id] : null,
        metadata ? ["Metadata", metadata] : null,
      ], "batch-overview"),
    );

    const progressCard = section(
      "Progress",
      progressBar(progress),
      definitionList([
        ["Done", `${fmtInt(progress.done)} of ${fmtInt(progress.total)} (${fmtPercent(progress.fraction * 100)})`],
        ["Output tok/s", fmtRate(progress.output_tokens_per_second)],
        ["Time left", batch.ended ? "—" : fmtDuration(progress.eta_seconds)],
        ["Window left", batch.ended ? "—" : fmtDuration(progress.window_left_seconds)],
      ], "batch-progress"),
    );

    const timelineRows = (batch.timeline || []).map((step, index, steps) =>
      el(
        "tr",
        { dataset: { status: step.status } },
        el("td", null, badge(step.status)),
        cell(fmtTime(step.at), "time"),
        num(index ? `+${fmtDuration(step.at - steps[index - 1].at)}` : ""),
      ),
    );
    const timeline = section("Timeline", table("batch-timeline", "data compact", ["State", "At", { text: "After", className: "num" }], timelineRows));

    const countRows = ["total", "pending", "running", "succeeded", "errored", "canceled", "expired"].map((name) =>
      el("tr", { dataset: { count: name } }, cell(name), num(fmtInt(counts[name]))),
    );
    const countsCard = section("Requests", table("batch-counts", "data compact", ["", { text: "Requests", className: "num" }], countRows));

    const usageCard = section(
      "Usage",
      table("batch-usage", "data compact", ["", { text: "Tokens", className: "num" }], [
        el("tr", { dataset: { usage: "input" } }, cell("input"), num(fmtInt(usage.input_tokens))),
        el("tr", { dataset: { usage: "cached" } }, cell("cached"), num(fmtInt(usage.cached_tokens))),
        el("tr", { dataset: { usage: "output" } }, cell("output"), num(fmtInt(usage.output_tokens))),
      ]),
    );

    const costCard = section(
      "Cost",
      table("batch-cost", "data compact", ["", { text: cost.currency, className: "num" }], [
        el("tr", { dataset: { cost: "batch" } }, cell("at batch prices"), num(fmtMoney(cost.batch, cost.currency))),
        el("tr", { dataset: { cost: "realtime" } }, cell("at realtime prices"), num(fmtMoney(cost.realtime, cost.currency))),
        el(
          "tr",
          { dataset: { cost: "saving" }, className: "saving" },
          cell("saving"),
          el("td", { className: "num", id: "batch-saving" }, `${fmtMoney(cost.saving, cost.currency)} (${fmtPercent(cost.saving_percent)})`),
        ),
      ]),
    );

    const cards = [overview, progressCard, timeline, countsCard, usageCard, costCard];

    const validation = batch.validation_errors || [];
    if (validation.length) {
      cards.push(
        section(
          "Validation errors",
          table(
            "batch-validation-errors",
            "data wide",
            [{ text: "Line", className: "num" }, "Code", "Param", "Message"],
            validation.map((error) =>
              el("tr", null, num(error.line ?? "—"), cell(error.code || "—", "mono"), cell(error.param || "—", "mono"), cell(error.message || "")),
            ),
          ),
        ),
      );
    }

    const failures = batch.failures || [];
    if (failures.length) {
      cards.push(
        section(
          `First failures (${failures.length}${counts.errored > failures.length ? ` of ${fmtInt(counts.errored)}` : ""})`,
          table(
            "batch-failures",
            "data wide",
            [{ text: "Line", className: "num" }, "Custom ID", "State", { text: "HTTP", className: "num" }, "Message"],
            failures.map((failure) =>
              el(
                "tr",
                { dataset: { customId: failure.custom_id ?? "" } },
                num(failure.line ?? "—"),
                cell(failure.custom_id ?? "—", "mono"),
                cell(failure.state),
                num(failure.status_code ?? "—"),
                cell(failure.message || ""),
              ),
            ),
          ),
        ),
      );
    }
    return cards;
  }

  // ---------------------------------------------------------------- usage

  function renderUsage(view) {
    const days = el(
      "select",
      { id: "usage-days", on: { change: () => { state.usageDays = Number(days.value); stopPolling(); poll(refresh, USAGE_POLL_MS, "usage"); } } },
      [7, 14, 30, 90, 366].map((n) => el("option", { value: String(n), text: `last ${n} days` })),
    );
    days.value = String(state.usageDays);
    const holder = el("div", { id: "usage-holder" });
    const prices = el("div", { id: "usage-prices" });
    view.append(
      el("div", { className: "page-head" }, el("h1", { text: "Usage" }), el("div", { className: "controls" }, el("label", { className: "control" }, "Period ", days))),
      el("p", { className: "muted", text: "Succeeded batch requests per UTC day, with what they cost at batch prices and what the same tokens would have cost at realtime prices." }),
      holder,
      prices,
    );

    async function refresh(current) {
      const data = await getJSON(`/console/api/usage${query({ days: state.usageDays })}`);
      if (!current()) return false;
      holder.replaceChildren(usageTable(data));
      prices.replaceChildren(pricesCard(data.prices));
      return true;
    }

    poll(refresh, USAGE_POLL_MS, "usage");
  }

  function usageTable(data) {
    const currency = data.prices ? data.prices.currency : "";
    const totals = { batches: 0, requests: 0, input_tokens: 0, cached_tokens: 0, output_tokens: 0, batch: 0, realtime: 0, saving: 0 };
    const rows = [...data.data].reverse().map((day) => {
      for (const name of ["batches", "requests", "input_tokens", "cached_tokens", "output_tokens"]) totals[name] += day[name];
      totals.batch += day.cost.batch;
      totals.realtime += day.cost.realtime;
      totals.saving += day.cost.saving;
      return usageRow(day.date, day, day.cost, { dataset: { date: day.date } });
    });
    const totalCost = {
      currency: (data.data[0] && data.data[0].cost.currency) || currency,
      batch: totals.batch,
      realtime: totals.realtime,
      saving: totals.saving,
      saving_percent: totals.realtime ? (100 * totals.saving) / totals.realtime : 0,
    };
    const foot = data.data.length ? [usageRow("Total", totals, totalCost, { className: "total", id: "usage-total" })] : [];
    const wrap = table(
      "usage-table",
      "data",
      [
        "Date",
        { text: "Batches", className: "num" },
        { text: "Requests", className: "num" },
        { text: "Input tokens", className: "num" },
        { text: "Cached tokens", className: "num" },
        { text: "Output tokens", className: "num" },
        { text: "Cost (batch)", className: "num" },
        { text: "Cost (realtime)", className: "num" },
        { text: "Saving", className: "num" },
      ],
      rows,
      foot,
    );
    if (!data.data.length) wrap.append(empty("No succeeded batch requests in this period."));
    return wrap;
  }

  function usageRow(label, counts, cost, props) {
    return el(
      "tr",
      props,
      cell(label),
      num(fmtInt(counts.batches)),
      num(fmtInt(counts.requests)),
      num(fmtInt(counts.input_tokens)),
      num(fmtInt(counts.cached_tokens)),
      num(fmtInt(counts.output_tokens)),
      num(fmtMoney(cost.batch, cost.currency)),
      num(fmtMoney(cost.realtime, cost.currency)),
      num(`${fmtMoney(cost.saving, cost.currency)} (${fmtPercent(cost.saving_percent)})`),
    );
  }

  function pricesCard(prices) {
    if (!prices) return el("div");
    const row = (name, p) =>
      el(
        "tr",
        null,
        cell(name, "mono"),
        num(p.batch.input),
        num(p.batch.cached_input),
        num(p.batch.output),
        num(p.realtime.input),
        num(p.realtime.cached_input),
        num(p.realtime.output),
      );
    const rows = [row("default", prices.default), ...Object.entries(prices.models || {}).map(([name, p]) => row(name, p))];
    return section(
      `Prices (${prices.currency} per ${prices.per || "1M tokens"})`,
      table(
        "prices-table",
        "data compact",
        [
          "Model",
          { text: "Batch input", className: "num" },
          { text: "Batch cached", className: "num" },
          { text: "Batch output", className: "num" },
          { text: "Realtime input", className: "num" },
          { text: "Realtime cached", className: "num" },
          { text: "Realtime output", className: "num" },
        ],
        rows,
      ),
    );
  }

  // ---------------------------------------------------------------- engines

  function renderEngines(view) {
    const holder = el("div", { className: "grid", id: "engines-holder" });
    view.append(el("div", { className: "page-head" }, el("h1", { text: "Engines" })), holder);

    async function refresh(current) {
      const data = await getJSON("/console/api/engines");
      if (!current()) return false;
      holder.replaceChildren(...engineSections(data));
      return true;
    }

    poll(refresh, ENGINES_POLL_MS, "engines");
  }

  function engineSections(data) {
    const activity = data.activity;
    const stats = el(
      "div",
      { className: "stats", id: "engines-stats" },
      stat("Engine", data.engine_kind),
      stat("Batch capacity", fmtInt(data.batch_capacity)),
      stat("Running", fmtInt(data.running), "engines-running"),
      stat("Queued", fmtInt(data.queued), "engines-queued"),
      stat("Realtime share (1h)", fmtPercent(activity.realtime_share * 100), "realtime-share"),
    );
    const models = section(
      "Models",
      table(
        "models-table",
        "data",
        ["Model", "Engine", { text: "Context", className: "num" }, "Aliases", "Available"],
        data.models.map((model) =>
          el(
            "tr",
            { dataset: { model: model.id } },
            cell(model.id, "mono"),
            cell(model.engine),
            num(fmtInt(model.context_length)),
            cell(model.aliases.length ? model.aliases.join(", ") : "—", "mono"),
            el("td", null, el("span", { className: `badge ${model.available ? "status-completed" : "status-failed"}`, text: model.available ? "yes" : "no" })),
          ),
        ),
      ),
    );
    const queue = section(
      "Queue by tenant",
      data.queue_by_tenant.length
        ? table(
            "queue-table",
            "data compact",
            ["Tenant", { text: "Pending", className: "num" }, { text: "Running", className: "num" }],
            data.queue_by_tenant.map((q) => el("tr", { dataset: { tenant: q.tenant } }, cell(tenantName(q.tenant)), num(fmtInt(q.pending)), num(fmtInt(q.running)))),
          )
        : empty("Nothing queued."),
    );
    const chart = el(
      "section",
      { className: "card card-wide" },
      el("h2", { text: "Tokens generated, last hour" }),
      el(
        "p",
        { className: "muted" },
        `Realtime ${fmtInt(activity.realtime_tokens)} · batch ${fmtInt(activity.batch_tokens)} · realtime share `,
        el("strong", { text: fmtPercent(activity.realtime_share * 100) }),
      ),
      activityChart(activity.points),
      el(
        "div",
        { className: "legend" },
        el("span", { className: "swatch swatch-realtime" }),
        " realtime ",
        el("span", { className: "swatch swatch-batch" }),
        " batch",
      ),
    );
    models.classList.add("card-wide");
    return [stats, chart, models, queue];
  }

  function stat(label, value, id) {
    return el("div", { className: "stat", id }, el("div", { className: "stat-value", text: value }), el("div", { className: "stat-label", text: label }));
  }

  // Stacked bars, one a minute: realtime at the bottom, batch on top.
  function activityChart(points) {
    const width = 1200;
    const height = 240;
    const left = 56;
    const right = 8;
    const top = 10;
    const bottom = 26;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const max = Math.max(1, ...points.map((p) => p.realtime + p.batch));
    const scaleMax = niceCeil(max);
    const step = plotW / Math.max(1, points.length);
    const chart = svg("svg", {
      id: "engines-chart",
      class: "chart",
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": "Tokens generated per minute over the last hour, realtime and batch",
    });
    for (const fraction of [0, 0.5, 1]) {
      const y = top + plotH - fraction * plotH;
      chart.append(
        svg("line", { class: "grid-line", x1: left, x2: width - right, y1: y, y2: y }),
        svg("text", { class: "axis-label", x: left - 6, y: y + 4, "text-anchor": "end", text: fmtCompact(scaleMax * fraction) }),
      );
    }
    points.forEach((point, index) => {
      const x = left + index * step + 1;
      const w = Math.max(1, step - 2);
      const realtimeH = (point.realtime / scaleMax) * plotH;
      const batchH = (point.batch / scaleMax) * plotH;
      const base = top + plotH;
      const group = svg("g", { class: "minute" });
      group.append(svg("title", { text: `${new Date(point.minute * 1000).toLocaleTimeString()}: realtime ${point.realtime}, batch ${point.batch} tokens` }));
      group.append(svg("rect", { class: "bar-hit", x: x - 1, y: top, width: step, height: plotH }));
      if (realtimeH > 0) group.append(svg("rect", { class: "bar-realtime", x, y: base - realtimeH, width: w, height: realtimeH }));
      if (batchH > 0) group.append(svg("rect", { class: "bar-batch", x, y: base - realtimeH - batchH, width: w, height: batchH }));
      chart.append(group);
    });
    const labels = [
      [0, "-60 min"],
      [Math.floor(points.length / 2), "-30 min"],
      [points.length - 1, "now"],
    ];
    for (const [index, text] of labels) {
      if (!points[index]) continue;
      const x = left + index * step + step / 2;
      chart.append(svg("text", { class: "axis-label", x, y: height - 8, "text-anchor": index === 0 ? "start" : index === points.length - 1 ? "end" : "middle", text }));
    }
    chart.append(svg("line", { class: "axis-line", x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
    return el("div", { className: "chart-wrap" }, chart);
  }

  function niceCeil(value) {
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const factor of [1, 2, 2.5, 5, 10]) {
      if (factor * magnitude >= value) return factor * magnitude;
    }
    return 10 * magnitude;
  }

  function fmtCompact(value) {
    if (value >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
    if (value >= 1e3) return `${+(value / 1e3).toFixed(1)}k`;
    return String(+value.toFixed(1));
  }

  // ---------------------------------------------------------------- go

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
