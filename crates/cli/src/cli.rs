//! Command-line interface.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Workflow automation for online-course businesses"
)]
pub struct Cli {
    /// Configuration file (default: herald.toml in the working folder, if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP server and the workers in one process.
    Serve {
        /// Development mode: generate (and keep in herald-dev.secret) a webhook secret if none is set.
        #[arg(long)]
        dev: bool,
    },
    /// Run the workers only, without HTTP.
    Worker,
    /// Check workflows and templates; errors name file, line and column.
    Check,
    /// Render every send step of a workflow for an event, sending nothing.
    Preview {
        /// Workflow id (its file name without .yaml).
        workflow: String,
        /// A CloudEvents JSON file.
        #[arg(long)]
        event: PathBuf,
        /// Also print the workflow as a Mermaid flowchart (paste it into GitHub, GitLab or a wiki).
        #[arg(long)]
        diagram: bool,
        /// A fact of the contact's state for conditions such as `holds_offer`, beyond what the
        /// event itself says: `holds_offer=o_pro`, `completed_lesson=l_2`, ... (repeatable).
        #[arg(long, value_name = "FACT=ID")]
        assume: Vec<String>,
    },
    /// Sign and post events (a JSON object or array), as a course platform would.
    SendEvent {
        file: PathBuf,
        /// Base URL of herald (default: HERALD_PUBLIC_URL).
        #[arg(long)]
        url: Option<String>,
    },
    /// Magic links: regenerate a learner's, or show the site's user (staff) link.
    Links {
        #[command(subcommand)]
        action: LinksAction,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Match stored events since a time to workflows again, starting the runs they did not start
    /// (a workflow added or fixed later); nothing runs twice.
    Replay {
        /// RFC 3339 time, date (UTC midnight), or a duration ago (24h, 7d).
        #[arg(long, value_name = "TIME")]
        since: String,
        /// Only this workflow (repeatable); default: every enabled workflow started by events.
        #[arg(long, value_name = "ID")]
        workflow: Vec<String>,
        /// Print what would be replayed, store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the dev mailbox.
    Mailbox {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Subcommand)]
pub enum LinksAction {
    /// Mint a new learner link for a contact; every older one stops working.
    Regenerate {
        #[arg(long, value_name = "ID")]
        contact: String,
    },
    /// Print the user (staff) magic link.
    User {
        /// Replace it; the old one stops working.
        #[arg(long)]
        regenerate: bool,
    },
}
