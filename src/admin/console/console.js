// The duro console: namespaces, their objects and an object's storage, read from the admin
// server's JSON API (/api/), and live charts of the server's /metrics. Plain script, no
// libraries, nothing fetched from elsewhere. Everything shown that comes from storage is put
// in the page as text (textContent), never as HTML.
"use strict";

(() => {
  /** Where the token is kept: this tab only, gone when it closes. */
  const TOKEN_KEY = "duro.token";
  /** How often /metrics is read. */
  const POLL_MS = 1000;
  /** Points a chart keeps: the last two minutes at one a second. */
  const HISTORY = 120;
  /** Objects of a page of a namespace, and keys of a page of an object. */
  const PAGE_OBJECTS = 100;
  const PAGE_KEYS = 100;

  const $ = (id) => document.getElementById(id);

  /** An element with properties (`class`, `text`, `on*` handlers, attributes) and children. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // --- Requests --------------------------------------------------------------------------

  /** The server refused the token (or none was given); the sign-in form is showing. */
  class Unauthorized extends Error {}

  /** An answer of the API that is not 200: its status and the server's message. */
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** `fetch` with the token, when there is one. A 401 asks for the token. */
  async function request(path) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers, cache: "no-store" });
    if (response.status === 401) {
      // A refusal of a token given up since (a poll sent before signing in again) is old news.
      if (sessionStorage.getItem(TOKEN_KEY) === token) {
        if (token) sessionStorage.removeItem(TOKEN_KEY);
        showLogin(token ? "The server refused this token." : "");
      }
      throw new Unauthorized("sign in first");
    }
    return response;
  }

  /** `GET /api/{endpoint}` with the parameters that are set; the JSON answer. */
  async function api(endpoint, params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null && value !== "") query.set(key, value);
    }
    const text = query.toString();
    const response = await request("api/" + endpoint + (text ? "?" + text : ""));
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new ApiError(response.status, body.error || response.statusText);
    return body;
  }

  // --- Sign in ---------------------------------------------------------------------------

  function showLogin(message) {
    const form = $("login");
    $("login-error").textContent = message;
    if (form.hidden) {
      form.hidden = false;
      $("token").focus();
    }
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    $("login").hidden = true;
    render();
  });

  // --- Views -----------------------------------------------------------------------------

  /** Bumped by each render, so that a slow answer does not draw over a newer view. */
  let generation = 0;

  /** The view the location's hash names: `#/`, `#/ns/NS`, `#/ns/NS/after/HEX`, `#/ns/NS/id/HEX`. */
  function parseHash() {
    let parts;
    try {
      parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    } catch {
      return { view: "namespaces" };
    }
    if (parts[0] === "ns" && parts.length >= 2) {
      const namespace = parts[1];
      if (parts[2] === "id" && parts[3]) return { view: "object", namespace, id: parts[3] };
      if (parts[2] === "after" && parts[3]) return { view: "objects", namespace, after: parts[3] };
      return { view: "objects", namespace };
    }
    return { view: "namespaces" };
  }

  const hashOf = {
    namespace: (ns) => "#/ns/" + encodeURIComponent(ns),
    page: (ns, after) => hashOf.namespace(ns) + "/after/" + encodeURIComponent(after),
    object: (ns, id) => hashOf.namespace(ns) + "/id/" + encodeURIComponent(id),
  };

  function crumbs(route) {
    const nav = $("crumbs");
    nav.replaceChildren(el("a", { href: "#/", text: "namespaces" }));
    if (route.namespace !== undefined) {
      nav.append(el("a", { href: hashOf.namespace(route.namespace), text: route.namespace }));
    }
    if (route.view === "object") nav.append(el("span", { class: "mono", text: short(route.id) }));
  }

  async function render() {
    const mine = ++generation;
    const route = parseHash();
    crumbs(route);
    const view = $("view");
    try {
      let content;
      if (route.view === "namespaces") content = await namespacesView();
      else if (route.view === "objects") content = await objectsView(route);
      else content = await objectView(route);
      if (mine === generation) view.replaceChildren(content);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof Unauthorized) {
        view.replaceChildren(el("p", { text: "Sign in to see this server." }));
      } else {
        view.replaceChildren(el("p", { class: "error", text: String(error.message || error) }));
      }
    }
  }

  async function namespacesView() {
    const namespaces = await api("namespaces");
    const rows = namespaces.map((ns) =>
      el("tr", {},
        el("td", {}, el("a", { href: hashOf.namespace(ns.name), "data-namespace": ns.name, text: ns.name })),
        el("td", { class: "mono", text: ns.class })));
    return el("section", { id: "namespaces" },
      el("h2", { text: "Namespaces" }),
      el("table", {},
        el("thead", {}, el("tr", {}, el("th", { text: "Namespace" }), el("th", { text: "Class" }))),
        el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { class: "empty", colspan: "2", text: "none" })))));
  }

  async function objectsView(route) {
    const page = await api("objects", { namespace: route.namespace, after: route.after, limit: PAGE_OBJECTS });
    const rows = page.objects.map((object) =>
      el("tr", {},
        el("td", { class: "mono" },
          el("a", { href: hashOf.object(route.namespace, object.id), "data-object-id": object.id, title: object.id, text: short(object.id) })),
        object.name === null
          ? el("td", { class: "name empty", text: "unique ID" })
          : el("td", { class: "name", text: object.name }),
        el("td", { text: date(object.created_ms) }),
        el("td", { text: object.alarm_ms === null ? "" : date(object.alarm_ms) })));
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { class: "empty", colspan: "4", text: route.after ? "no more objects" : "no objects have stored anything yet" })));
    }
    const pager = el("div", { class: "toolbar" },
      route.after ? el("a", { href: hashOf.namespace(route.namespace), text: "« first page" }) : null,
      page.more ? el("a", { id: "next-page", href: hashOf.page(route.namespace, page.next), text: "next page »" }) : null);
    return el("section", { id: "objects" },
      el("h2", { text: "Objects of " + route.namespace }),
      jumpForm(route.namespace),
      el("table", {},
        el("thead", {}, el("tr", {}, ["ID", "Name", "Created", "Alarm"].map((h) => el("th", { text: h })))),
        el("tbody", {}, rows)),
      pager);
  }

  /** A box to open an object by its name or its hex ID. The server derives a name's ID. */
  function jumpForm(namespace) {
    const input = el("input", { id: "jump", placeholder: "object name or 64-hex-digit ID", "aria-label": "Object name or ID" });
    const message = el("span", { class: "error" });
    const form = el("form", { class: "toolbar", id: "jump-form" }, input, el("button", { type: "submit", text: "Open" }), message);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = input.value;
      if (!text) return;
      message.textContent = "";
      try {
        let object = null;
        if (/^[0-9a-fA-F]{64}$/.test(text)) {
          // A name may look like an ID too: one this namespace did not mint is tried as a name.
          object = await api("object", { namespace, id: text.toLowerCase(), limit: 1 })
            .catch((error) => { if (error.status === 400) return null; throw error; });
        }
        object = object || await api("object", { namespace, name: text, limit: 1 });
        location.hash = hashOf.object(namespace, object.id);
      } catch (error) {
        message.textContent = error.message;
      }
    });
    return form;
  }

  async function objectView(route) {
    const { namespace, id } = route;
    // The storage's pages: the cursor of each page shown so far, to go back to the first.
    let prefix = "";
    let after = null;
    const first = await api("object", { namespace, id, limit: PAGE_KEYS });
    const facts = el("dl", { class: "facts", id: "object-facts" });
    const body = el("tbody", {});
    const pager = el("div", { class: "toolbar" });
    const status = el("span", { class: "error" });

    const show = (page) => {
      facts.replaceChildren(
        el("dt", { text: "ID" }), el("dd", { class: "mono", text: page.id }),
        el("dt", { text: "Name" }), el("dd", { id: "object-name", text: page.name === null ? "(none: reached by a unique ID)" : page.name }),
        el("dt", { text: "Created" }), el("dd", { text: date(page.created_ms) }),
        el("dt", { text: "Alarm" }), el("dd", { id: "object-alarm", text: page.alarm_ms === null ? "none" : date(page.alarm_ms) }));
      const rows = page.entries.map(entryRow);
      if (!rows.length) rows.push(el("tr", {}, el("td", { class: "empty", colspan: "3", text: "no keys" + (prefix ? " with this prefix" : "") })));
      body.replaceChildren(...rows);
      const buttons = [
        after !== null && el("button", { type: "button", text: "« first page", onclick: () => load(null) }),
        page.more && el("button", { type: "button", id: "next-keys", text: "next page »", onclick: () => load(page.next_b64) }),
      ];
      pager.replaceChildren(...buttons.filter(Boolean));
    };
    const load = async (cursor) => {
      const mine = generation;
      status.textContent = "";
      try {
        const page = await api("object", { namespace, id, prefix, start_after_b64: cursor, limit: PAGE_KEYS });
        if (mine !== generation) return;
        after = cursor;
        show(page);
      } catch (error) {
        status.textContent = error.message;
      }
    };

    const prefixInput = el("input", { id: "prefix", placeholder: "key prefix", "aria-label": "Key prefix" });
    const filter = el("form", { class: "toolbar" }, prefixInput, el("button", { type: "submit", text: "Filter" }), status);
    filter.addEventListener("submit", (event) => {
      event.preventDefault();
      prefix = prefixInput.value;
      load(null);
    });
    show(first);
    return el("section", { id: "object" },
      el("h2", { text: "Object of " + namespace }),
      facts,
      el("h2", { text: "Storage (read-only)" }),
      filter,
      el("table", { id: "entries" },
        el("thead", {}, el("tr", {}, ["Key", "Encoding", "Value"].map((h) => el("th", { text: h })))),
        body),
      pager);
  }

  function entryRow(entry) {
    const key = entry.key !== undefined ? el("span", { text: entry.key }) : el("span", { class: "b64", text: entry.key_b64 });
    let value;
    if (entry.value === undefined) value = el("span", { class: "b64", text: entry.value_b64 });
    else if (entry.encoding === "cbor") value = el("pre", { text: JSON.stringify(entry.value, null, 2) });
    else value = el("pre", { text: entry.value });
    return el("tr", {},
      el("td", { class: "key mono" }, key),
      el("td", { class: "encoding", text: entry.encoding + " · " + entry.bytes + " B" }),
      el("td", { class: "value" }, value, entry.error ? el("div", { class: "error", text: entry.error }) : null));
  }

  /** `ms` since the epoch as a date, in UTC (the server's logs are too). */
  function date(ms) {
    if (ms === null || ms === undefined) return "";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function short(id) {
    return id.length > 16 ? id.slice(0, 16) + "…" : id;
  }

  // --- Metrics ---------------------------------------------------------------------------

  /**
   * Prometheus / OpenMetrics text as samples `{ name, labels, value }`. Comments are skipped;
   * label values are unescaped (`\\`, `\"`, `\n`).
   */
  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const brace = line.indexOf("{");
      const space = line.indexOf(" ");
      const labels = {};
      let rest;
      let name;
      if (brace >= 0 && (space < 0 || brace < space)) {
        name = line.slice(0, brace);
        let i = brace + 1;
        while (i < line.length && line[i] !== "}") {
          const eq = line.indexOf("=", i);
          if (eq < 0 || line[eq + 1] !== "\"") break;
          const key = line.slice(i, eq).trim();
          let value = "";
          i = eq + 2;
          while (i < line.length && line[i] !== "\"") {
            if (line[i] === "\\" && i + 1 < line.length) {
              i++;
              value += line[i] === "n" ? "\n" : line[i];
            } else {
              value += line[i];
            }
            i++;
          }
          labels[key] = value;
          i++; // the closing quote
          if (line[i] === ",") i++;
        }
        rest = line.slice(i + 1);
      } else {
        name = line.slice(0, space);
        rest = line.slice(space);
      }
      const value = number(rest.trim().split(/\s+/)[0]);
      if (!Number.isNaN(value)) samples.push({ name, labels, value });
    }
    return samples;
  }

  function number(text) {
    if (text === "+Inf" || text === "Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    return text === "" ? NaN : Number(text);
  }

  /** The sum of every sample named `name`, whatever its labels. */
  function total(samples, name) {
    return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
  }

  /** A histogram's cumulative bucket counts summed over its other labels, by upper bound. */
  function buckets(samples, name) {
    const byBound = new Map();
    for (const s of samples) {
      if (s.name !== name + "_bucket") continue;
      const bound = number(s.labels.le);
      byBound.set(bound, (byBound.get(bound) || 0) + s.value);
    }
    return [...byBound.entries()].sort((a, b) => a[0] - b[0]);
  }

  /**
   * The `q` quantile of what a histogram counted between two reads (cumulative buckets
   * `before` and `now`), interpolated inside its bucket as Prometheus' histogram_quantile
   * does; null when nothing was counted.
   */
  function quantile(q, before, now) {
    const old = new Map(before);
    const delta = now.map(([bound, count]) => [bound, count - (old.get(bound) || 0)]);
    const count = delta.length ? delta[delta.length - 1][1] : 0;
    if (count <= 0) return null;
    const rank = q * count;
    let lower = 0;
    let below = 0;
    for (const [bound, cumulative] of delta) {
      if (cumulative >= rank) {
        if (bound === Infinity) return lower;
        return lower + (bound - lower) * ((rank - below) / Math.max(cumulative - below, 1e-9));
      }
      lower = bound;
      below = cumulative;
    }
    return lower;
  }

  const METRICS = {
    calls: "duro_calls_total",
    latency: "duro_call_seconds",
    objects: "duro_objects_active",
    commits: "duro_storage_commits_total",
  };

  /** A chart: its canvas and its series, each a color and its last HISTORY points. */
  function chart(id, series) {
    return { canvas: $(id), series: series.map(([name, color]) => ({ name, color, points: [] })) };
  }

  const charts = {
    calls: chart("chart-calls", [["calls", "#2563eb"]]),
    latency: chart("chart-latency", [["p50", "#7c3aed"], ["p99", "#dc2626"]]),
    objects: chart("chart-objects", [["objects", "#059669"]]),
    commits: chart("chart-commits", [["commits", "#d97706"]]),
  };

  /** The previous read of /metrics: its time and the counters rates are taken from. */
  let previous = null;

  /** Adds one read of /metrics to the charts. */
  function record(samples, at) {
    const now = {
      at,
      calls: total(samples, METRICS.calls),
      commits: total(samples, METRICS.commits),
      latency: buckets(samples, METRICS.latency),
    };
    // A counter that went down means the server restarted: no rate across it.
    const rate = (key) => {
      if (!previous || now[key] < previous[key]) return null;
      return (now[key] - previous[key]) / Math.max((at - previous.at) / 1000, 1e-3);
    };
    const ms = (q) => {
      if (!previous) return null;
      const value = quantile(q, previous.latency, now.latency);
      return value === null ? null : value * 1000;
    };
    push(charts.calls, [rate("calls")]);
    push(charts.latency, [ms(0.5), ms(0.99)]);
    push(charts.objects, [total(samples, METRICS.objects)]);
    push(charts.commits, [rate("commits")]);
    previous = now;
  }

  function push(chart, values) {
    chart.series.forEach((series, i) => {
      series.points.push(values[i]);
      if (series.points.length > HISTORY) series.points.shift();
    });
    draw(chart);
  }

  /** The smallest of 1, 2, 5 × 10^k at or above `value`: the top of a chart's scale. */
  function niceCeiling(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  function format(value) {
    if (value === null || value === undefined) return "–";
    if (value >= 100 || Number.isInteger(value)) return String(Math.round(value));
    return value.toPrecision(3);
  }

  function draw(chart) {
    const canvas = chart.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const pad = 16 * ratio;
    const visible = chart.series.flatMap((s) => s.points).filter((v) => v !== null);
    const top = niceCeiling(Math.max(0, ...visible));
    // The newest point at the right, clear of the edge; zero clear of the bottom.
    const right = width - 4 * ratio;
    const bottom = height - 3 * ratio;
    const x = (i) => right - ((HISTORY - 1 - i) / (HISTORY - 1)) * right;
    const y = (v) => bottom - (v / top) * (bottom - pad);

    ctx.strokeStyle = "#e5e7eb";
    ctx.lineWidth = 1;
    for (const f of [0, 0.5, 1]) {
      const at = Math.round(y(top * f)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(0, at);
      ctx.lineTo(width, at);
      ctx.stroke();
    }

    ctx.lineWidth = 2 * ratio;
    ctx.lineJoin = "round";
    for (const series of chart.series) {
      const offset = HISTORY - series.points.length;
      ctx.strokeStyle = ctx.fillStyle = series.color;
      ctx.beginPath();
      let drawing = false;
      series.points.forEach((v, i) => {
        if (v === null) {
          drawing = false;
          return;
        }
        const [px, py] = [x(i + offset), y(v)];
        if (drawing) ctx.lineTo(px, py);
        else ctx.moveTo(px, py);
        drawing = true;
        // A point alone (the first, or after a gap) is drawn as a dot.
        const before = series.points[i - 1];
        const after = series.points[i + 1];
        if ((before === null || before === undefined) && (after === null || after === undefined)) {
          ctx.fillRect(px - 2 * ratio, py - 2 * ratio, 4 * ratio, 4 * ratio);
        }
      });
      ctx.stroke();
    }

    ctx.font = `${11 * ratio}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    ctx.fillStyle = "#5c6578";
    ctx.textAlign = "left";
    ctx.fillText(format(top), 2 * ratio, 1);
    ctx.textAlign = "right";
    const latest = chart.series.map((s) => `${s.name} ${format(s.points[s.points.length - 1])}`);
    ctx.fillText(latest.join("  "), width - 2 * ratio, 1);
  }

  /** Reads /metrics once a second, for as long as the page is open (not while signed out). */
  async function poll() {
    try {
      if ($("login").hidden) {
        const response = await request("metrics");
        if (!response.ok) throw new Error("/metrics answered " + response.status);
        record(parseMetrics(await response.text()), performance.now());
        $("poll-status").textContent = "metrics at " + new Date().toLocaleTimeString();
      }
    } catch (error) {
      if (!(error instanceof Unauthorized)) {
        $("poll-status").textContent = "metrics: " + (error.message || error);
      }
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  /** What the charts hold, for a look from the browser's console (and the tests). */
  window.duroConsole = {
    charts,
    series: (name) => Object.values(charts).flatMap((c) => c.series).find((s) => s.name === name).points,
    parseMetrics,
    quantile,
  };

  window.addEventListener("hashchange", render);
  window.addEventListener("resize", () => Object.values(charts).forEach(draw));
  render();
  poll();
})();
