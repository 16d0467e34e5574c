//! herald as its users run it: real `herald serve` and `herald worker` processes (the binary this
//! package builds, started as child processes), a real SMTP server, SQLite and PostgreSQL. What
//! in-process tests cannot show is tested here: a `kill -9` in the middle of a burst of login-link
//! welcomes, several processes sharing one PostgreSQL database, DKIM configured the way an operator does it, a worker whose links the HTTP
//! process must accept, and a reload on one process reaching the others.

mod harness;

mod crash;
mod dkim;
mod memory;
mod replay;
mod scale_out;
