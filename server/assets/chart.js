// A repository's growth as a small line chart in SVG (no library): its size over the
// samples the daemon keeps after each run, with the first and last dates and the
// largest size as labels, and a text alternative for screen readers.

import { t, date, bytes } from "./i18n.js";

const NS = "http://www.w3.org/2000/svg";
const W = 320;
const H = 110;
const PAD = { left: 4, right: 4, top: 14, bottom: 18 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text != null) el.textContent = text;
  return el;
}

/** The chart of `samples` (oldest first: at, size_bytes), or a note when too few. */
export function growthChart(samples, id) {
  if (samples.length < 2) {
    const p = document.createElement("p");
    p.className = "hint chart-empty";
    p.textContent = t("overview.growth_wait");
    return p;
  }
  const xs = samples.map((s) => new Date(s.at).getTime());
  const ys = samples.map((s) => Number(s.size_bytes) || 0);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const top = Math.max(...ys) || 1;
  const x = (v) => PAD.left + ((v - x0) / Math.max(1, x1 - x0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const points = samples.map((_, i) => `${x(xs[i]).toFixed(1)},${y(ys[i]).toFixed(1)}`).join(" ");
  const first = samples[0];
  const last = samples[samples.length - 1];
  const label = t("overview.growth_alt", {
    from: bytes(first.size_bytes), to: bytes(last.size_bytes), since: date(first.at), until: date(last.at),
  });
  const el = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "growth", id });
  el.append(
    svg("title", {}, label),
    svg("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, stroke: "#d9dde4" }),
    svg("polygon", { points: `${x(x0)},${H - PAD.bottom} ${points} ${x(x1)},${H - PAD.bottom}`, fill: "#1f5fbf", "fill-opacity": "0.12" }),
    svg("polyline", { points, fill: "none", stroke: "#1f5fbf", "stroke-width": 2, "stroke-linejoin": "round" }),
    svg("text", { x: PAD.left, y: 10, "font-size": 10, fill: "#5b6577" }, bytes(top)),
    svg("text", { x: PAD.left, y: H - 4, "font-size": 10, fill: "#5b6577" }, date(first.at)),
    svg("text", { x: W - PAD.right, y: H - 4, "font-size": 10, fill: "#5b6577", "text-anchor": "end" }, date(last.at)),
  );
  return el;
}
