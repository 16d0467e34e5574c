//! `cargo test-all` (an alias in `.cargo/config.toml`): the whole test suite under cargo-nextest,
//! installed first where it is missing, so that the README's one command works on a machine with
//! only Rust. nextest rather than `cargo test`: each test gets its own process, so process-wide
//! state (the Prometheus recorder) is the test's own and its exact counts can be asserted.
//! Arguments are passed on to `cargo nextest run`.

use std::ffi::OsString;
use std::process::{Command, ExitCode, Stdio};

fn main() -> ExitCode {
    // The cargo that ran this task, so a toolchain chosen by rustup applies to every step.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let has_nextest = Command::new(&cargo)
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_nextest {
        eprintln!(
            "cargo-nextest is missing: installing it with `cargo install cargo-nextest --locked` \
             (once, a few minutes)"
        );
        let installed = Command::new(&cargo)
            .args(["install", "cargo-nextest", "--locked"])
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            eprintln!(
                "error: installing cargo-nextest failed (see above); install it yourself, then \
                 run `cargo test-all` again"
            );
            return ExitCode::FAILURE;
        }
    }
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut nextest = Command::new(&cargo);
    nextest.args(["nextest", "run", "--locked"]);
    if !selects_packages(&args) {
        nextest.arg("--workspace");
    }
    let status = nextest.args(&args).status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(s.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: cannot run `cargo nextest`: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the arguments choose the packages themselves (`-p NAME`, `--package NAME`,
/// `--workspace`); nextest would otherwise let `--workspace` override a `-p`. Arguments after
/// `--` belong to the test binaries.
fn selects_packages(args: &[OsString]) -> bool {
    args.iter()
        .map_while(|a| a.to_str().filter(|a| *a != "--"))
        .any(|a| {
            a == "--workspace"
                || a.starts_with("--package")
                || (a.starts_with("-p") && !a.starts_with("--"))
        })
}

#[cfg(test)]
mod tests {
    use super::selects_packages;

    fn selects(args: &[&str]) -> bool {
        selects_packages(&args.iter().map(Into::into).collect::<Vec<_>>())
    }

    #[test]
    fn a_named_package_replaces_the_whole_workspace() {
        assert!(selects(&["-p", "herald", "config"]));
        assert!(selects(&["-pherald"]));
        assert!(selects(&["--package=herald"]));
        assert!(selects(&["--workspace", "--exclude", "herald-bench"]));
        assert!(!selects(&["config"]));
        assert!(!selects(&["--no-fail-fast", "-E", "test(metrics)"]));
        assert!(!selects(&["--", "-p"]));
    }
}
