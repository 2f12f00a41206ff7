//! The web client in a real browser: Debian's headless Chromium driven over
//! WebDriver by Debian's `chromedriver` (built from the same source), two
//! people in two browser sessions against a real standalone gateway
//! process. One scenario, run step by step: a failure saves both pages'
//! screenshots and prints their console logs and the gateway's log.
//!
//! Chromium comes from `e2e/local/chromium.sh install` (the test command
//! runs it); without it this test fails saying so.

mod standalone;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use serde_json::{Value, json};
use standalone::Gateway;

/// Starting chromedriver and a browser on a loaded two-core machine.
const LAUNCH: Duration = Duration::from_secs(60);
/// One step seen from the page (a message arriving, a receipt, a reconnect).
const STEP: Duration = Duration::from_secs(20);

/// `chromedriver` on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(log: &Path) -> Self {
        let binary = which("chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < LAUNCH, "chromedriver did not listen on {port} within {LAUNCH:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, url }
    }

    /// A browser of its own (profile in `profile`), headless, as large as a laptop's window.
    async fn session(&self, profile: &Path) -> Client {
        let capabilities: Capabilities = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": which("chromium"),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1200,800", format!("--user-data-dir={}", profile.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }))
        .expect("capabilities");
        let connecting = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await;
        let client = tokio::time::timeout(LAUNCH, async { connecting })
            .await
            .expect("a browser session within the launch timeout")
            .unwrap_or_else(|e| panic!("chromedriver could not start Chromium: {e}"));
        client.set_window_size(1200, 800).await.expect("window size");
        client
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> String {
    let found = Command::new("sh").args(["-c", &format!("command -v {program}")]).output().expect("sh");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    assert!(
        found.status.success() && !path.is_empty(),
        "{program} is not installed: run `bash e2e/local/chromium.sh install` (Debian's chromium and chromium-driver)"
    );
    path
}

/// chromedriver's `se/log`: the page's console messages since the last call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

/// One person's page.
struct Page {
    name: &'static str,
    client: Client,
}

impl Page {
    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{}: {css}: {e}", self.name));
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    /// Clicks the element once it is there; again if the page re-rendered
    /// it between finding and clicking (lists are redrawn as frames arrive).
    async fn click(&self, css: &str) {
        let started = Instant::now();
        loop {
            let clicked = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.click().await,
                Err(e) => Err(e),
            };
            match clicked {
                Ok(()) => return,
                Err(e) => assert!(started.elapsed() < STEP, "{}: could not click {css:?}: {e}", self.name),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until an element matching `css` contains `text`; its text.
    async fn wait_for(&self, css: &str, text: &str, within: Duration) -> String {
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            if let Ok(elements) = self.client.find_all(Locator::Css(css)).await {
                seen.clear();
                for element in elements {
                    let shown = element.text().await.unwrap_or_default();
                    if shown.contains(text) {
                        return shown;
                    }
                    seen.push(shown);
                }
            }
            assert!(
                started.elapsed() < within,
                "{}: no {css:?} containing {text:?} within {within:?}; saw {seen:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no element matching `css` contains `text`.
    async fn wait_gone(&self, css: &str, text: &str) {
        let started = Instant::now();
        loop {
            let elements = self.client.find_all(Locator::Css(css)).await.unwrap_or_default();
            let mut present = false;
            for element in elements {
                present |= element.text().await.unwrap_or_default().contains(text);
            }
            if !present {
                return;
            }
            assert!(started.elapsed() < STEP, "{}: {css:?} still shows {text:?}", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the last element matching `css` says `text`.
    async fn wait_last(&self, css: &str, text: &str) {
        let script = "const all = document.querySelectorAll(arguments[0]); \
                      return all.length ? all[all.length - 1].textContent : null;";
        let started = Instant::now();
        loop {
            let shown = self.client.execute(script, vec![json!(css)]).await.expect("run a script");
            if shown == json!(text) {
                return;
            }
            assert!(started.elapsed() < STEP, "{}: the last {css:?} shows {shown}, not {text:?}", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sign_in(&self, base: &str, user: &str, device: &str) {
        self.client.goto(base).await.expect("open the web client");
        self.fill("#user", user).await;
        self.fill("#device", device).await;
        self.click("#sign-in").await;
        self.wait_for("#status", &format!("connected as {user} ({device})"), STEP).await;
    }

    async fn say(&self, text: &str) {
        self.fill("#composer", text).await;
        self.click("#send").await;
        self.wait_for(".message.mine[data-id] .text", text, STEP).await;
    }

    async fn open(&self, channel: &str) {
        self.click(&format!(".channel[data-channel=\"{channel}\"]")).await;
    }

    async fn save_screenshot(&self, path: &Path) {
        match self.client.screenshot().await {
            Ok(png) => {
                std::fs::write(path, png).expect("write screenshot");
                eprintln!("{}: screenshot in {}", self.name, path.display());
            }
            Err(e) => eprintln!("{}: no screenshot: {e}", self.name),
        }
    }

    async fn print_console(&self) {
        match self.client.issue_cmd(BrowserLog).await {
            Ok(Value::Array(lines)) => {
                eprintln!("---- {}'s browser console ({} lines)", self.name, lines.len());
                for line in lines {
                    eprintln!("{} {}", line["level"], line["message"]);
                }
            }
            other => eprintln!("{}: browser console unavailable: {other:?}", self.name),
        }
    }
}

/// Runs `scenario`; if it fails, saves what the pages show and what they
/// and the gateway logged, then fails with the scenario's message.
async fn with_evidence<F: Future<Output = ()>>(pages: [&Page; 2], gateway_log: &Path, out: &Path, scenario: F) {
    let outcome = std::panic::AssertUnwindSafe(scenario).catch_unwind().await;
    if let Err(panic) = outcome {
        for page in pages {
            page.save_screenshot(&out.join(format!("failed-{}.png", page.name))).await;
            page.print_console().await;
        }
        eprintln!("---- gateway log\n{}", std::fs::read_to_string(gateway_log).unwrap_or_default());
        std::panic::resume_unwind(panic);
    }
}

/// Where the screenshot of the conversation goes: `KUBECHAT_SCREENSHOTS`
/// if set (docs/web-client.png is made that way), else the test's scratch
/// folder. A failure's screenshots go to the target dir's
/// `tmp/web_client/`, which outlives the test.
fn screenshot_dir(scratch: &Path) -> PathBuf {
    std::env::var_os("KUBECHAT_SCREENSHOTS").map_or_else(|| scratch.to_path_buf(), PathBuf::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = Some(Gateway::start(dir.path()));
    let port = gateway.as_ref().expect("started").port;
    gateway.as_mut().expect("started").connect("probe").await;
    let base = format!("http://127.0.0.1:{port}/");
    let driver = Driver::start(&dir.path().join("chromedriver.log")).await;
    let alice = Page { name: "alice", client: driver.session(&dir.path().join("profile-alice")).await };
    let bob = Page { name: "bob", client: driver.session(&dir.path().join("profile-bob")).await };
    let shots = screenshot_dir(dir.path());
    let gateway_log = dir.path().join(format!("gateway-{port}.log"));

    let evidence = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web_client");
    std::fs::create_dir_all(&evidence).expect("evidence folder");
    with_evidence([&alice, &bob], &gateway_log, &evidence, async {
        alice.sign_in(&base, "alice", "laptop").await;
        bob.sign_in(&base, "bob", "phone").await;

        // 1:1: alice writes first; bob sees the channel with one unread message.
        alice.fill("#new-chat-user", "bob").await;
        alice.click("#new-chat").await;
        alice.wait_for("#conversation-title", "bob", STEP).await;
        alice.say("hello bob").await;
        bob.wait_for(".channel[data-channel=\"dm:alice:bob\"] .unread", "1", STEP).await;
        bob.open("dm:alice:bob").await;
        bob.wait_for(".message .text", "hello bob", STEP).await;

        // Bob read it: alice's message shows the read receipt, and bob's unread count is gone.
        alice.wait_last(".message.mine[data-id] .receipt", "read").await;
        bob.wait_gone(".channel[data-channel=\"dm:alice:bob\"] .unread", "1").await;

        // Typing reaches the peer, and ends with the message.
        bob.fill("#composer", "hi alice").await;
        alice.wait_for("#typing", "bob is typing", STEP).await;
        bob.click("#send").await;
        alice.wait_for(".message .text", "hi alice", STEP).await;
        alice.wait_gone("#typing", "bob is typing").await;

        // A second device of alice's (another browser): it starts where the
        // first one is, and the two stay in sync both ways.
        let tablet = Page { name: "alice-tablet", client: driver.session(&dir.path().join("profile-tablet")).await };
        tablet.sign_in(&base, "alice", "tablet").await;
        tablet.wait_for(".channel[data-channel=\"dm:alice:bob\"] .preview", "bob: hi alice", STEP).await;
        bob.say("are you there").await;
        tablet.wait_for(".channel[data-channel=\"dm:alice:bob\"] .preview", "bob: are you there", STEP).await;
        alice.wait_for(".message .text", "are you there", STEP).await;
        // Read on the laptop (its conversation is open): the tablet's count clears.
        tablet.wait_gone(".channel[data-channel=\"dm:alice:bob\"] .unread", "1").await;
        tablet.open("dm:alice:bob").await;
        tablet.say("from the tablet").await;
        alice.wait_for(".message.mine .text", "from the tablet", STEP).await;
        bob.wait_for(".message .text", "from the tablet", STEP).await;
        tablet.client.close().await.expect("close the tablet's browser");

        // A group round trip.
        alice.fill("#new-group-name", "team").await;
        alice.fill("#new-group-members", "bob").await;
        alice.click("#new-group").await;
        alice.wait_for("#conversation-title", "team", STEP).await;
        alice.say("hello team").await;
        bob.wait_for(".channel .name", "team", STEP).await;
        bob.click(".channel:first-child").await;
        bob.wait_for("#conversation-title", "team", STEP).await;
        bob.wait_for(".message .text", "hello team", STEP).await;
        bob.say("hi team").await;
        alice.wait_for(".message .text", "hi team", STEP).await;

        // An oversized message is refused with the server's error, shown to the user.
        let long = "x".repeat(100_001);
        alice
            .client
            .execute("document.getElementById('composer').value = arguments[0];", vec![json!(long)])
            .await
            .expect("fill the composer");
        alice.click("#send").await;
        alice.wait_for("#error", "message_too_long", STEP).await;

        // A reload restores the session and the history.
        bob.client.refresh().await.expect("reload");
        bob.wait_for("#status", "connected as bob", STEP).await;
        bob.open("dm:alice:bob").await;
        bob.wait_for(".message .text", "hello bob", STEP).await;
        bob.wait_for(".message .text", "hi alice", STEP).await;

        // The server restarts: both pages reconnect by themselves and sync.
        alice.open("dm:alice:bob").await;
        let stopped = gateway.take().expect("running").stop();
        assert!(stopped.success(), "clean stop: {stopped}");
        alice.wait_for("#status", "reconnecting", STEP).await;
        let restarted = gateway.insert(Gateway::start_on(dir.path(), port));
        // Sent as soon as the gateway is back, likely before the pages return: they get it by sync.
        let mut carol = restarted.connect("carol").await;
        let ack = standalone::send(&mut carol, "alice", "while you were away", "away-1").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        alice.wait_for("#status", "connected as alice", STEP).await;
        bob.wait_for("#status", "connected as bob", STEP).await;
        alice.wait_for(".channel[data-channel=\"dm:alice:carol\"] .preview", "while you were away", STEP).await;
        alice.say("after the restart").await;
        bob.wait_for(".message .text", "after the restart", STEP).await;
        alice.wait_last(".message.mine[data-id] .receipt", "read").await;
        alice.wait_for(".channel[data-channel=\"dm:alice:carol\"] .unread", "1", STEP).await;
        alice.save_screenshot(&shots.join("web-client.png")).await;

        // A phone-sized window: the list first, then the conversation with a way back.
        alice.client.set_window_size(390, 844).await.expect("phone size");
        alice.click("#back").await;
        assert!(alice.client.find(Locator::Css("#channels")).await.expect("list").is_displayed().await.expect("shown"));
        alice.open("dm:alice:bob").await;
        let composer = alice.client.find(Locator::Css("#composer")).await.expect("composer");
        assert!(composer.is_displayed().await.expect("composer shown"), "the conversation fills the phone's screen");
        let list = alice.client.find(Locator::Css("#channels")).await.expect("list");
        assert!(!list.is_displayed().await.expect("list state"), "the list makes room for the conversation");
    })
    .await;

    alice.client.close().await.expect("close alice's browser");
    bob.client.close().await.expect("close bob's browser");
}
