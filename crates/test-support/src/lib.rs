//! What herald's test suites and its benchmark share, so that each is written once:
//!
//! - [`postgres`]: a fresh PostgreSQL schema per test, dropped at the end, skipped with a note
//!   when the server is unreachable (except under `CI=true`, where that fails the test);
//! - [`smtp`]: a real SMTP server on loopback that herald delivers to as to a relay, recording
//!   what it receives and refusing or holding messages on request.

pub mod postgres;
pub mod smtp;

/// The name of the running test: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned()
}
