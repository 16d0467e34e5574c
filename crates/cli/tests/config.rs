//! Configuration as an operator writes it, checked against the real binary: every `HERALD_*`
//! value is the string written (a phone number keeps its `+`, a token its leading zeros), and no
//! error prints a secret.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "0012345678";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `herald serve --dev` in an empty working folder with these extra variables.
fn herald(dir: &tempfile::TempDir, port: u16, vars: &[(&str, &str)]) -> Command {
    for folder in ["workflows", "templates"] {
        std::fs::create_dir_all(dir.path().join(folder)).unwrap();
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.current_dir(dir.path())
        .args(["serve", "--dev"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "HERALD_DATABASE_URL",
            format!("sqlite://{}/h.db", dir.path().display()),
        )
        .env("HERALD_LOG", "warn")
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// A plain HTTP/1.1 GET; returns the status code.
fn get(port: u16, path: &str, bearer: Option<&str>) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn phone_numbers_and_digit_tokens_in_the_environment_are_kept_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = herald(
        &dir,
        port,
        &[
            ("HERALD_SMS_FROM", "+15005550006"),
            ("HERALD_SMS_URL", "http://127.0.0.1:9"),
            ("HERALD_SMS_ACCOUNT_SID", "AC123"),
            ("HERALD_SMS_AUTH_TOKEN", "000111222"),
            ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN),
            ("HERALD_LEARNER_LINK_USES", "7"),
        ],
    )
    .spawn()
    .expect("herald starts");
    let mut running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/healthz", None) != Some(200) {
        if let Some(status) = running.0.try_wait().unwrap() {
            let mut err = String::new();
            running
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("herald exited ({status}) instead of serving:\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "herald did not become healthy in 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The token with its leading zeros is the one the admin API accepts.
    assert_eq!(get(port, "/v1/messages", Some(ADMIN_TOKEN)), Some(200));
    assert_eq!(get(port, "/v1/messages", Some("12345678")), Some(401));
}

#[test]
fn a_bad_number_is_named_and_no_secret_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let output = herald(
        &dir,
        free_port(),
        &[
            ("HERALD_LEARNER_LINK_USES", "five"),
            ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN),
            ("HERALD_SMS_AUTH_TOKEN", "000111222"),
        ],
    )
    .output()
    .expect("herald runs");
    assert!(!output.status.success(), "a bad number must stop startup");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("LEARNER_LINK_USES") && err.contains("\"five\" is not a whole number"),
        "{err}"
    );
    assert!(
        !err.contains(ADMIN_TOKEN) && !err.contains("000111222"),
        "{err}"
    );
}
