// Every call the dashboard makes goes through here, to /api/v1 with the session cookie;
// changes carry the session's CSRF token. A 401 means the session ended: the app goes
// back to the login.

let csrf = null;
let onLoggedOut = () => {};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setSession(s) {
  csrf = s ? s.csrf : null;
}

export function whenLoggedOut(f) {
  onLoggedOut = f;
}

export async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const r = await fetch(`/api/v1${path}`, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let v = null;
  try {
    v = text ? JSON.parse(text) : null;
  } catch {
    v = null;
  }
  if (!r.ok) {
    const e = v && v.error ? v.error : { code: "http", message: `${r.status} ${r.statusText}` };
    if (r.status === 401 && path !== "/session") onLoggedOut(e.message);
    throw new ApiError(r.status, e.code, e.message);
  }
  return v;
}

export const get = (p) => call("GET", p);
export const post = (p, b = {}) => call("POST", p, b);
export const del = (p) => call("DELETE", p);
