//! A small WebDriver client (the W3C protocol over HTTP, with ureq) driving Debian's
//! chromium through its chromedriver, headless: enough to log in, click, type, read
//! text, run a script and take screenshots. No crate that downloads drivers.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::require;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a page may take to show what a step waits for.
const WAIT: Duration = Duration::from_secs(30);

/// Whether the browser and its driver are installed (in CI they must be).
pub fn browser_ready(what: &str) -> bool {
    require(
        Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
        what,
        "chromium and chromium-driver (scripts/install-deps.sh --test)",
    )
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(method: &str, url: &str, body: Option<&Value>) -> Result<Value, String> {
    let req = ureq::request(method, url).timeout(Duration::from_secs(90));
    let res = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("{method} {url}: {e}")),
    };
    let status = resp.status();
    let v: Value = resp
        .into_json()
        .map_err(|e| format!("{method} {url}: {e}"))?;
    if status >= 400 {
        return Err(format!("{method} {url}: {status} {}", v["value"]));
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// A headless chromium with a window of `width` x `height`, in English.
    pub fn start(width: u32, height: u32) -> Self {
        // The port is chosen free, then taken by the driver: if another process took it
        // in between, the driver exits, and another port is tried.
        for _ in 0..5 {
            let port = free_port();
            let mut driver = Command::new(CHROMEDRIVER)
                .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting chromedriver");
            let base = format!("http://127.0.0.1:{port}");
            let start = Instant::now();
            let ready = loop {
                if http("GET", &format!("{base}/status"), None).is_ok_and(|v| v["ready"] == true) {
                    break true;
                }
                if driver.try_wait().unwrap().is_some() || start.elapsed() > WAIT {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if !ready {
                let _ = driver.kill();
                let _ = driver.wait();
                continue;
            }
            let caps = json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--lang=en-US",
                             format!("--window-size={width},{height}")],
                    "prefs": { "intl.accept_languages": "en-US,en" },
                },
            }}});
            let v = http("POST", &format!("{base}/session"), Some(&caps)).unwrap();
            let session = v["sessionId"].as_str().unwrap().to_owned();
            return Self {
                driver,
                base,
                session,
            };
        }
        panic!("chromedriver did not come up on any of five ports");
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        http(
            method,
            &format!("{}/session/{}{path}", self.base, self.session),
            body,
        )
    }

    pub fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))
            .unwrap();
    }

    /// The window's size, as a phone's or a desktop's.
    pub fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        )
        .unwrap();
    }

    pub fn refresh(&self) {
        self.cmd("POST", "/refresh", Some(&json!({}))).unwrap();
    }

    fn try_find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .ok()?;
        v[ELEMENT].as_str().map(str::to_owned)
    }

    pub fn count(&self, css: &str) -> usize {
        self.cmd(
            "POST",
            "/elements",
            Some(&json!({ "using": "css selector", "value": css })),
        )
        .map_or(0, |v| v.as_array().map_or(0, Vec::len))
    }

    /// Waits for an element matching `css`.
    pub fn find(&self, css: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(e) = self.try_find(css) {
                return e;
            }
            assert!(
                start.elapsed() < WAIT,
                "no {css} after {WAIT:?}; the page says: {}",
                self.page_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(&json!({})))
            .unwrap();
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), Some(&json!({})))
            .unwrap();
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(&json!({ "text": text })),
        )
        .unwrap();
    }

    /// Picks the option `value` of the select `css`, as a user's choice does (a
    /// `change` event).
    pub fn select(&self, css: &str, value: &str) {
        self.find(css);
        let script = format!(
            "const done = arguments[0]; const el = document.querySelector({css:?}); el.value = {value:?};\
             el.dispatchEvent(new Event('change', {{ bubbles: true }})); done(el.value);"
        );
        assert_eq!(
            self.run_async(&script),
            value,
            "{css} has no option {value:?}"
        );
    }

    pub fn value(&self, css: &str) -> String {
        let e = self.find(css);
        self.cmd("GET", &format!("/element/{e}/property/value"), None)
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn text(&self, css: &str) -> String {
        let e = self.find(css);
        self.cmd("GET", &format!("/element/{e}/text"), None)
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }

    pub fn page_text(&self) -> String {
        self.try_find("body")
            .and_then(|e| self.cmd("GET", &format!("/element/{e}/text"), None).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits until the text of `css` contains `want`.
    pub fn wait_text(&self, css: &str, want: &str) {
        self.wait_text_within(css, want, WAIT);
    }

    /// Waits up to `wait` until the text of `css` contains `want` (for what takes long:
    /// a database server's start).
    pub fn wait_text_within(&self, css: &str, want: &str, wait: Duration) {
        let start = Instant::now();
        loop {
            if self.try_find(css).is_some() && self.text(css).contains(want) {
                return;
            }
            assert!(
                start.elapsed() < wait,
                "{css} never said {want:?}; the page says: {}",
                self.page_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `script` (an async function body: `arguments[0]` is the callback) in the
    /// page; returns what it passes to the callback.
    pub fn run_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(&json!({ "script": script, "args": [] })),
        )
        .unwrap()
    }

    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let v = self.cmd("GET", "/screenshot", None).unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.cmd("DELETE", "", None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
