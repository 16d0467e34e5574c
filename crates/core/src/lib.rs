//! The pure domain of herald: what a course event is, what a workflow is, how the two match, how
//! messages render and how webhooks are signed. Nothing here touches the network, the disk or a
//! clock: every function takes what it needs, so all of it is unit-testable and reusable by the
//! CLI (`herald check`, `herald preview`) without a database.

pub mod duration;
pub mod event;
pub mod locale;
pub mod signature;
pub mod status;
pub mod template;
pub mod time;
pub mod workflow;

pub use duration::Duration;
pub use event::{CourseEvent, EventError, EventType};
pub use status::{Channel, MessageStatus, RunState};
pub use time::Timestamp;
pub use workflow::{CompiledWorkflow, Diagnostic, WorkflowBundle};

/// The text of a caught panic (`catch_unwind`, a `JoinError`), for the loops and the writer that
/// go on after one.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".into())
}
