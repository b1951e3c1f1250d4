// Text and formats by language: one catalogue per language (i18n/<lang>.json), the
// choice remembered in this browser; dates, numbers and sizes through Intl.

const LANGS = ["en", "fr"];
const KEY = "cairn.lang";
let lang = "en";
let text = {};

export function current() {
  return lang;
}

export function languages() {
  return LANGS;
}

/** The language to start in: the remembered one, else the browser's, else English. */
function preferred() {
  const saved = localStorage.getItem(KEY);
  if (LANGS.includes(saved)) return saved;
  const nav = (navigator.language || "en").slice(0, 2);
  return LANGS.includes(nav) ? nav : "en";
}

export async function load(want) {
  const next = want || preferred();
  const r = await fetch(`/ui/i18n/${next}.json`, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`catalogue ${next}: ${r.status}`);
  text = await r.json();
  lang = next;
  if (want) localStorage.setItem(KEY, next);
  document.documentElement.lang = next;
  for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
}

/** The text of `key`, with `{name}` replaced from `vars`. */
export function t(key, vars = {}) {
  const s = text[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (_, k) => (k in vars ? String(vars[k]) : `{${k}}`));
}

export function date(v) {
  if (!v) return "—";
  return new Intl.DateTimeFormat(lang, { dateStyle: "medium", timeStyle: "short" }).format(new Date(v));
}

export function number(n, digits = 0) {
  return new Intl.NumberFormat(lang, { maximumFractionDigits: digits }).format(n);
}

export function percent(x) {
  return new Intl.NumberFormat(lang, { style: "percent", maximumFractionDigits: 1 }).format(x);
}

/** Bytes in binary units, the unit's name from the catalogue (French says "Gio"). */
export function bytes(n) {
  const units = t("unit.bytes").split(",");
  let i = 0;
  let v = Number(n) || 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${number(v, i === 0 ? 0 : 1)} ${units[i]}`;
}

/** How long ago (or in how long) `v` is, in words of the language. */
export function relative(v) {
  if (!v) return "—";
  const secs = (new Date(v).getTime() - Date.now()) / 1000;
  const f = new Intl.RelativeTimeFormat(lang, { numeric: "auto" });
  const steps = [["day", 86400], ["hour", 3600], ["minute", 60]];
  for (const [unit, s] of steps) if (Math.abs(secs) >= s) return f.format(Math.round(secs / s), unit);
  return f.format(Math.round(secs), "second");
}

export function seconds(s) {
  if (s == null) return "—";
  if (s < 60) return `${number(s, 1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}
