// Building the page: elements from a tag, attributes and children. Text always goes in
// as text (never as HTML), so names from the API cannot inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v == null) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A table: a header row of `heads`, then one row per item of `rows` (cells). */
export function table(heads, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, heads.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
    ),
  );
}

/** A status word as a coloured badge. */
export function badge(kind, label) {
  return h("span", { class: `badge ${kind}` }, label);
}

export function replace(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c != null));
}

/** An error as an alert paragraph. */
export function errorBox(e) {
  return h("p", { class: "error", role: "alert" }, e.message || String(e));
}
