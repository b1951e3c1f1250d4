// Snapshots: the list with filters (host, source, tag, time, free text), forget with a
// dry-run preview, the comparison of two, "verify now" on a row (verifications.js); a browser into one snapshot (folders, sizes,
// modes, times), downloads, and a restore of a selection to a path on the host after a
// preview that names any conflict.

import * as api from "./api.js";
import { h, table, replace, errorBox } from "./dom.js";
import { t, date, bytes, number } from "./i18n.js";
import { verifyButton } from "./verifications.js";

const enc = encodeURIComponent;

/** `#/browse/<repo>/<id>/<path>`: the path as one component. */
export function browseHref(repo, id, path = "/") {
  return `#/browse/${enc(repo)}/${enc(id)}/${enc(path)}`;
}

function options(id, label, values) {
  return h("label", {}, label, " ",
    h("select", { id }, h("option", { value: "" }, t("snapshots.any")), values.map((v) => h("option", { value: v }, v))));
}

function distinct(list) {
  return [...new Set(list.filter((v) => v != null && v !== ""))].sort();
}

/** Whether snapshot `s` passes the filter fields of `form`. */
function passes(s, f) {
  if (f.host && s.host !== f.host) return false;
  if (f.source && s.source !== f.source) return false;
  if (f.tag && !(s.tags || []).includes(f.tag)) return false;
  const at = new Date(s.time).getTime();
  if (f.from && at < new Date(`${f.from}T00:00:00`).getTime()) return false;
  if (f.until && at >= new Date(`${f.until}T00:00:00`).getTime() + 86400000) return false;
  if (f.text && ![s.id, s.host, s.source, ...(s.tags || [])].join(" ").toLowerCase().includes(f.text)) return false;
  return true;
}

export async function list(main, ctx, wanted) {
  const repos = (await api.get("/repositories")).repositories;
  const name = wanted || (repos[0] || {}).name || "default";
  const all = (await api.get(`/repositories/${enc(name)}/snapshots?limit=100000`)).snapshots;
  const repoPick = repos.length > 1
    ? h("label", {}, t("col.repository"), " ", h("select", { id: "snap-repo", onchange: (e) => { location.hash = `#/snapshots/${enc(e.target.value)}`; } },
        repos.map((r) => h("option", { value: r.name, selected: r.name === name }, r.name))))
    : "";
  const fields = h("div", { class: "filters" },
    options("snap-host", t("col.host"), distinct(all.map((s) => s.host))),
    options("snap-source", t("col.source"), distinct(all.map((s) => s.source))),
    options("snap-tag", t("col.tags"), distinct(all.flatMap((s) => s.tags || []))),
    h("label", {}, t("snapshots.from"), " ", h("input", { type: "date", id: "snap-from" })),
    h("label", {}, t("snapshots.until"), " ", h("input", { type: "date", id: "snap-until" })),
    h("input", { type: "search", id: "snap-filter", "aria-label": t("snapshots.filter"), placeholder: t("snapshots.filter") }),
  );
  const value = (id) => fields.querySelector(`#${id}`).value;
  const listEl = h("div");
  const actions = h("div", { class: "actions" });
  const preview = h("div", { id: "forget-preview", "aria-live": "polite" });
  const verified = h("div", { id: "verify-result", "aria-live": "polite" });
  // After a forget: the list again, with what was done in its preview box.
  const redraw = async (message) => {
    await list(main, ctx, name);
    replace(main.querySelector("#forget-preview"), message);
  };
  const picked = () => [...listEl.querySelectorAll("input.pick:checked")].map((c) => c.value);
  const drawActions = () => {
    const ids = picked();
    const compare = h("button", { type: "button", id: "snap-compare", disabled: ids.length !== 2, onclick: () => {
      const [a, b] = all.filter((s) => ids.includes(s.id)).sort((x, y) => new Date(x.time) - new Date(y.time));
      location.hash = `#/diff/${enc(name)}/${enc(a.id)}/${enc(b.id)}`;
    } }, t("snapshots.compare"));
    const forget = ctx.canChange
      ? h("button", { type: "button", id: "snap-forget", disabled: ids.length === 0, onclick: () => forgetPreview(name, ids, preview, redraw) }, t("snapshots.forget", { n: number(ids.length) }))
      : "";
    replace(actions, h("span", {}, t("snapshots.selected", { n: number(ids.length) })), " ", compare, " ", forget);
  };
  const draw = () => {
    const f = { host: value("snap-host"), source: value("snap-source"), tag: value("snap-tag"), from: value("snap-from"), until: value("snap-until"), text: value("snap-filter").trim().toLowerCase() };
    const shown = all.filter((s) => passes(s, f));
    replace(
      listEl,
      h("p", { id: "snap-shown" }, t("snapshots.shown", { n: number(Math.min(shown.length, 500)), total: number(shown.length) })),
      table(
        ["", t("col.snapshot"), t("col.time"), t("col.host"), t("col.source"), t("col.tags"), t("col.size"), ""],
        shown.slice(0, 500).map((s) => [
          h("input", { type: "checkbox", class: "pick", value: s.id, "aria-label": t("snapshots.pick", { id: s.id.slice(0, 8) }), onchange: drawActions }),
          h("a", { href: browseHref(name, s.id), class: "snap" }, h("code", {}, s.id.slice(0, 8))),
          date(s.time), s.host, s.source, (s.tags || []).join(", "), bytes((s.summary || {}).total_bytes || 0),
          ctx.canChange
            ? h("span", { class: "row-actions" },
                (s.database && s.database.method === "physical") || s.vm
                  ? [h("a", { href: `#/recover/${enc(name)}/${enc(s.id)}`, class: "recover", "data-snapshot": s.id }, t("recover.action")), " "]
                  : "",
                verifyButton(name, s.id, verified))
            : "",
        ]),
        t("snapshots.none"),
      ),
    );
    drawActions();
  };
  fields.addEventListener("input", draw);
  fields.addEventListener("change", draw);
  replace(main, h("h1", {}, t("snapshots.title", { name })), repoPick, h("p", {}, t("snapshots.count", { n: number(all.length) })), fields, actions, preview, verified, listEl);
  draw();
}

/** Forget: the API's dry run first, then the same request for real once confirmed. */
async function forgetPreview(repo, ids, el, redraw) {
  const path = `/repositories/${enc(repo)}/forget`;
  try {
    const plan = await api.post(path, { snapshots: ids, dry_run: true });
    const gone = plan.snapshots.filter((d) => !d.keep);
    const go = h("button", { type: "button", id: "forget-confirm", class: "danger", onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        const done = await api.post(path, { snapshots: ids, dry_run: false });
        await redraw(h("p", { role: "status" }, t("snapshots.forgotten", { n: number(done.removed) })));
      } catch (e) {
        replace(el, errorBox(e));
      }
    } }, t("snapshots.forget_confirm", { n: number(gone.length) }));
    replace(el, h("div", { class: "preview" },
      h("p", {}, t("snapshots.forget_plan", { n: number(gone.length) })),
      h("ul", {}, gone.map((d) => h("li", {}, h("code", {}, String(d.id).slice(0, 8)), " ", date(d.time)))),
      go, " ", h("button", { type: "button", onclick: () => replace(el) }, t("snapshots.cancel"))));
  } catch (e) {
    replace(el, errorBox(e));
  }
}

/** `drwxr-xr-x` from an entry's type and mode. */
function modeString(kind, mode) {
  const first = { dir: "d", symlink: "l", file: "-" }[kind] || "?";
  const bits = "rwxrwxrwx".split("").map((c, i) => (mode & (1 << (8 - i)) ? c : "-"));
  return first + bits.join("");
}

function parentOf(path) {
  const p = path.replace(/\/+$/, "").split("/").slice(0, -1).join("/");
  return p || "/";
}

export async function browse(main, ctx, repo, id, path = "/") {
  const base = `/repositories/${enc(repo)}/snapshots/${enc(id)}`;
  const ls = await api.get(`${base}/ls?path=${enc(path)}`);
  const snap = ls.snapshot;
  const crumbs = [h("a", { href: browseHref(repo, snap, "/") }, "/")];
  let at = "";
  for (const part of path.split("/").filter(Boolean)) {
    at += `/${part}`;
    crumbs.push(" ", h("a", { href: browseHref(repo, snap, at) }, part), " /");
  }
  const rows = ls.entries.map((e) => [
    h("input", { type: "checkbox", class: "pick", value: e.path, "aria-label": t("browse.pick", { name: e.name }) }),
    e.type === "dir"
      ? h("a", { href: browseHref(repo, snap, e.path), class: "dir" }, `${e.name}/`)
      : [e.name, e.target ? ` → ${e.target}` : ""],
    t(`kind.${e.type}`),
    e.type === "dir" ? "—" : bytes(e.size),
    h("code", {}, modeString(e.type, e.mode)),
    date(e.mtime),
    e.type === "file"
      ? h("a", { href: `/api/v1${base}/file?path=${enc(e.path)}`, download: e.name, class: "download" }, t("browse.download"))
      : "",
  ]);
  replace(
    main,
    h("h1", {}, t("browse.title", { id: snap.slice(0, 8) })),
    h("nav", { class: "crumbs", "aria-label": t("browse.where") }, crumbs),
    path !== "/" ? h("p", {}, h("a", { href: browseHref(repo, snap, parentOf(path)), id: "up" }, t("browse.up"))) : "",
    table(["", t("col.name"), t("col.type"), t("col.size"), t("col.mode"), t("col.modified"), ""], rows, t("browse.empty")),
    ctx.canChange ? restoreForm(base, path, main) : "",
  );
}

/** Restore the ticked entries (or this folder) to a path on the host: preview, then go. */
function restoreForm(base, path, main) {
  const target = h("input", { id: "restore-target", placeholder: "/var/tmp/restore", autocomplete: "off" });
  const result = h("div", { id: "restore-result", "aria-live": "polite" });
  const go = h("button", { type: "button", id: "restore-go", disabled: true }, t("restore.go"));
  const body = (dry) => {
    const ticked = [...main.querySelectorAll("input.pick:checked")].map((c) => c.value);
    const include = ticked.length ? ticked : path === "/" ? [] : [path];
    return { target: target.value.trim(), include, dry_run: dry };
  };
  const previewBtn = h("button", { type: "button", id: "restore-preview", onclick: async () => {
    go.disabled = true;
    try {
      const r = (await api.post(`${base}/restore`, body(true))).preview;
      replace(result, h("p", {}, t("restore.plan", { files: number(r.files), size: bytes(r.bytes), target: r.target })),
        r.conflict
          ? [h("p", { class: "error", role: "alert", id: "restore-conflict" }, r.conflict),
             r.existing.length ? h("ul", { class: "existing" }, r.existing.map((n) => h("li", {}, n))) : ""]
          : h("p", { class: "ok" }, t("restore.no_conflict")));
      go.disabled = Boolean(r.conflict);
    } catch (e) {
      replace(result, errorBox(e));
    }
  } }, t("restore.preview"));
  target.addEventListener("input", () => { go.disabled = true; });
  go.addEventListener("click", async () => {
    go.disabled = true;
    replace(result, h("p", { role: "status" }, t("restore.running")));
    try {
      const r = await api.post(`${base}/restore`, body(false));
      replace(result, h("p", { role: "status", class: "ok", id: "restore-done" }, t("restore.done", { files: number(r.restored.files ?? 0), target: r.target })));
    } catch (e) {
      replace(result, errorBox(e));
    }
  });
  return h("section", { class: "restore" },
    h("h2", {}, t("restore.title")),
    h("p", {}, t("restore.hint")),
    h("label", { for: "restore-target" }, t("restore.target")), " ", target, " ", previewBtn, " ", go, result);
}

export async function diff(main, ctx, repo, a, b) {
  const d = await api.get(`/repositories/${enc(repo)}/diff?from=${enc(a)}&to=${enc(b)}`);
  const counts = {};
  for (const c of d.changes) counts[c.change] = (counts[c.change] || 0) + 1;
  replace(
    main,
    h("h1", {}, t("diff.title", { a: d.from.slice(0, 8), b: d.to.slice(0, 8) })),
    h("p", { id: "diff-summary" }, Object.keys(counts).length
      ? Object.entries(counts).map(([k, n]) => `${t(`change.${k}`)}: ${number(n)}`).join(" · ")
      : t("diff.same")),
    d.truncated ? h("p", { class: "warn" }, t("diff.truncated", { n: number(d.changes.length), total: number(d.total) })) : "",
    table([t("col.change"), t("col.path")], d.changes.map((c) => [h("span", { class: `change ${c.change}` }, t(`change.${c.change}`)), h("code", {}, c.path)]), t("diff.same")),
  );
}
