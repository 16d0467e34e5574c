//! herald's HTTP-level test suite: one binary (so it links once), one module per area. Each test runs the
//! whole application in-process (`Application::build` on port 0) against SQLite and, when it is
//! reachable, PostgreSQL, with a real SMTP server (`herald_test_support::smtp`) on loopback.

#[macro_use]
mod helpers;
mod link_helpers;
mod twilio_stub;

mod delivery;
mod durability;
mod events;
mod health;
mod mailbox;
mod workflows;

mod browser;
mod links;
mod portal;

mod admin;
mod enrollments;
mod metrics;
mod operator;
mod opt_outs;
mod real_path;
mod shared_database;
mod sms;
mod suppressions;
