#!/usr/bin/env python3
"""Dashboard page load times (issue 19), in Debian's chromium through chromedriver's
W3C protocol (no client library): for each page, the first byte of `/` and of the API
calls the page makes (curl-like, from urllib), and the page fully drawn in the browser
(a fresh load of `URL#/page`, from the navigation's start to the app's `data-ready`
mark on <main>), five loads each, median and worst.

Usage: benches/dashboard.py URL TOKEN   (benches/dashboard.sh makes the site)
"""
import json
import statistics
import subprocess
import sys
import time
import urllib.request

URL, TOKEN = sys.argv[1], sys.argv[2]
PAGES = {
    "overview": ["/api/v1/jobs", "/api/v1/schedules", "/api/v1/runs?limit=200", "/api/v1/repositories",
                 "/api/v1/repositories/default/growth?days=90"],
    "jobs": ["/api/v1/jobs", "/api/v1/schedules"],
    "runs": ["/api/v1/runs?limit=100"],
    "snapshots": ["/api/v1/repositories/default/snapshots?limit=100000"],
    "health": ["/api/v1/repositories", "/api/v1/repositories/default/locks",
               "/api/v1/repositories/default/checks?limit=10"],
    "jobs/job-042": ["/api/v1/jobs/job-042", "/api/v1/runs?job=job-042&limit=50", "/api/v1/schedules"],
}
LOADS = 5


def wd(method, base, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["value"]


def first_byte(path):
    """Seconds to the first byte of the answer, and its size."""
    req = urllib.request.Request(URL + path, headers={"Authorization": f"Bearer {TOKEN}"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read(1)
        ttfb = time.perf_counter() - start
        size = 1 + len(r.read())
    return ttfb, size


def main():
    port = 19515
    driver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={port}", "--allowed-ips=127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if wd("GET", base, "/status")["ready"]:
                    break
            except OSError:
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--lang=en-US", "--window-size=1280,900"]}}}}
        sid = wd("POST", base, "/session", caps)["sessionId"]
        s = f"/session/{sid}"
        wd("POST", base, f"{s}/url", {"url": URL + "/"})
        # Log in with the token (the cookie session the pages use).
        wd("POST", base, f"{s}/execute/async", {"script": (
            "const done = arguments[1]; fetch('/api/v1/session', {method: 'POST', headers: "
            "{'Content-Type': 'application/json'}, body: JSON.stringify({token: arguments[0]})})"
            ".then(r => done(r.status));"), "args": [TOKEN]})
        print("| page | first byte of / and of its API calls | drawn in chromium (median / worst of 5) |")
        print("|---|---|---|")
        for page, calls in PAGES.items():
            firsts = [first_byte("/")] + [first_byte(c) for c in calls]
            fb = ", ".join(f"{t * 1000:.1f} ms ({n // 1024} KiB)" for t, n in firsts)
            drawn = []
            for _ in range(LOADS):
                wd("POST", base, f"{s}/url", {"url": "about:blank"})
                wd("POST", base, f"{s}/url", {"url": f"{URL}/#/{page}"})
                ms = wd("POST", base, f"{s}/execute/async", {"script": (
                    "const done = arguments[0]; const t0 = performance.timeOrigin;"
                    "const wait = () => { const m = document.querySelector('main[data-ready]');"
                    " if (m) done(Date.now() - t0); else setTimeout(wait, 5); }; wait();"), "args": []})
                drawn.append(ms)
            print(f"| #/{page} | {fb} | {statistics.median(drawn):.0f} ms / {max(drawn):.0f} ms |")
        wd("DELETE", base, s)
    finally:
        driver.kill()


main()
