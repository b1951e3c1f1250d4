// The dashboard: the login, the frame (navigation, who is logged in, the recovery task
// bar) and the page the address names (#/overview, #/jobs, #/runs/12, ...).

import * as api from "./api.js";
import { h, replace } from "./dom.js";
import * as i18n from "./i18n.js";
import * as pages from "./pages.js";
import * as snapshots from "./snapshots.js";
import { health } from "./health.js";
import { form as jobForm } from "./jobform.js";
import { recoverPage } from "./recovery.js";

const { t } = i18n;
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const bar = document.getElementById("taskbar");

const ctx = {
  session: null,
  canChange: false,
  leaving: [],
  onLeave(f) {
    this.leaving.push(f);
  },
  redraw() {
    frame();
    route();
  },
  refreshTaskbar() {
    pages.taskbar(bar, this);
  },
};

const PAGES = [
  ["overview", "nav.overview"],
  ["jobs", "nav.jobs"],
  ["runs", "nav.runs"],
  ["snapshots", "nav.snapshots"],
  ["health", "nav.health"],
  ["settings", "nav.settings"],
];

function frame() {
  nav.hidden = !ctx.session;
  if (!ctx.session) {
    replace(nav);
    replace(who);
    return;
  }
  replace(nav, h("ul", {}, PAGES.map(([p, key]) => h("li", {}, h("a", { href: `#/${p}`, id: `nav-${p}` }, t(key))))));
  replace(
    who,
    h("span", { id: "who-name" }, ctx.session.name),
    ctx.canChange ? "" : h("span", { class: "badge warn", id: "read-only" }, t("app.read_only")),
    h("button", { type: "button", id: "logout", onclick: logout }, t("app.logout")),
  );
}

/** Which address is being drawn: a page that finishes after a newer one started is
 * dropped (a slow overview must not replace the jobs page clicked meanwhile). */
let drawing = 0;

async function route() {
  for (const f of ctx.leaving.splice(0)) f();
  const mine = ++drawing;
  // `data-ready` names the page once it is drawn (what benches/dashboard.py times).
  main.removeAttribute("data-ready");
  if (!ctx.session) return loginPage();
  const [page, ...args] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const [arg] = args;
  // Pages inside a section light up their section's link.
  const section = { browse: "snapshots", diff: "snapshots", recover: "snapshots", "job-form": "jobs" }[page] || page || "overview";
  for (const a of nav.querySelectorAll("a")) {
    if (a.id === `nav-${section}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  // Each page draws into a view of its own, shown once drawn if it is still the
  // address asked for; the page before stays in sight meanwhile.
  const view = h("div", { class: "view" });
  const show = {
    overview: () => pages.overview(view, ctx),
    jobs: () => (arg ? pages.job(view, ctx, arg) : pages.jobs(view, ctx)),
    // #/job-form (a new job) or #/job-form/<name> (a job to change).
    "job-form": () => jobForm(view, ctx, arg || null),
    recover: () => recoverPage(view, ctx, args[0], args[1]),
    runs: () => (arg ? pages.run(view, ctx, arg) : pages.runs(view, ctx)),
    snapshots: () => snapshots.list(view, ctx, arg),
    browse: () => snapshots.browse(view, ctx, args[0], args[1], args[2] || "/"),
    diff: () => snapshots.diff(view, ctx, args[0], args[1], args[2]),
    health: () => health(view, ctx),
    settings: () => pages.settings(view, ctx),
  }[page || "overview"];
  try {
    if (!show) throw new Error(t("app.no_page"));
    await show();
    if (mine !== drawing) return;
    main.replaceChildren(view);
    document.title = `cairn · ${main.querySelector("h1")?.textContent || ""}`;
    main.setAttribute("data-ready", page || "overview");
  } catch (e) {
    if (e.status === 401 || mine !== drawing) return;
    replace(main, h("h1", {}, t("app.error")), h("p", { class: "error", role: "alert" }, e.message));
  }
  pages.taskbar(bar, ctx);
}

function loginPage(notice) {
  const error = h("p", { class: "error", role: "alert", id: "login-error" }, notice || "");
  const user = h("input", { id: "user", name: "user", autocomplete: "username" });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password" });
  const token = h("input", { id: "token", name: "token", type: "password", autocomplete: "off" });
  const submit = async (ev) => {
    ev.preventDefault();
    const body = token.value.trim() ? { token: token.value.trim() } : { user: user.value, password: password.value };
    try {
      const s = await api.post("/session", body);
      start(s);
    } catch (e) {
      replace(error, e.message);
      password.value = "";
    }
  };
  bar.hidden = true;
  replace(
    main,
    h("h1", {}, t("login.title")),
    h(
      "form",
      { id: "login", onsubmit: submit },
      h("fieldset", {}, h("legend", {}, t("login.with_password")),
        h("label", { for: "user" }, t("login.user")), user,
        h("label", { for: "password" }, t("login.password")), password),
      h("fieldset", {}, h("legend", {}, t("login.with_token")),
        h("label", { for: "token" }, t("login.token")), token),
      error,
      h("button", { type: "submit", id: "login-submit" }, t("login.submit")),
      languageSwitch(),
    ),
  );
}

function languageSwitch() {
  return h("p", { class: "langs" }, i18n.languages().map((l) =>
    h("button", { type: "button", class: "link", id: `lang-${l}`, lang: l, "aria-pressed": String(l === i18n.current()),
      onclick: async () => { await i18n.load(l); ctx.redraw(); } }, t(`lang.${l}`))));
}

function start(session) {
  ctx.session = session;
  ctx.canChange = !session.read_only;
  api.setSession(session);
  frame();
  route();
}

async function logout() {
  await api.del("/session").catch(() => {});
  ended(null);
}

function ended(message) {
  ctx.session = null;
  ctx.canChange = false;
  api.setSession(null);
  frame();
  loginPage(message);
}

api.whenLoggedOut((message) => ended(message));
window.addEventListener("hashchange", route);
setInterval(() => ctx.session && pages.taskbar(bar, ctx), 5000);

await i18n.load();
try {
  start(await api.get("/session"));
} catch {
  frame();
  loginPage();
}
