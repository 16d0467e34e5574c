//! The states of a run and a message and the channels a message goes by: the vocabulary the
//! store records, the engine decides on and the admin API shows, each spelled in one place.

/// A name that is none of a type's spellings (a database written by a newer herald, or damaged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {name:?}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
}

/// `TryFrom<String>` through `parse`, for reading a stored column.
macro_rules! from_name {
    ($($ty:ident: $kind:literal),*) => {$(
        impl TryFrom<String> for $ty {
            type Error = UnknownName;
            fn try_from(name: String) -> Result<Self, UnknownName> {
                Self::parse(&name).ok_or(UnknownName { kind: $kind, name })
            }
        }
    )*};
}
from_name!(RunState: "run state", Channel: "channel", MessageStatus: "message status");

/// Run states. `Active` runs are due at `due_ms`; `WaitingEvent` runs wait for an event or their
/// timeout at `due_ms`; `Parked` runs belong to a disabled workflow. The rest are final; `Dead`
/// runs were set aside because advancing them kept failing (the reason holds the last error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Active,
    WaitingEvent,
    Parked,
    Completed,
    Exited,
    Failed,
    Refused,
    Dead,
    /// Ended by an operator (`POST /v1/runs/{id}/cancel`).
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::WaitingEvent => "waiting_event",
            Self::Parked => "parked",
            Self::Completed => "completed",
            Self::Exited => "exited",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Active,
            Self::WaitingEvent,
            Self::Parked,
            Self::Completed,
            Self::Exited,
            Self::Failed,
            Self::Refused,
            Self::Dead,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
    /// A live run blocks a second enrollment of its contact in the same workflow.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Active | Self::WaitingEvent | Self::Parked)
    }
    /// A run in this state must send nothing more: its queued messages are cancelled. A
    /// completed run still sends what its last steps queued.
    pub fn stops_sends(self) -> bool {
        matches!(
            self,
            Self::Parked | Self::Exited | Self::Failed | Self::Dead | Self::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Sms => "sms",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "email" => Some(Self::Email),
            "sms" => Some(Self::Sms),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Queued,
    Sent,
    Failed,
    Skipped,
    Suppressed,
    /// Its run ended (exit, disabled workflow, failure, an operator's cancel) before it was sent.
    Cancelled,
    /// Set aside because recording its delivery kept failing (the reason holds the last error).
    Dead,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Suppressed => "suppressed",
            Self::Cancelled => "cancelled",
            Self::Dead => "dead",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Sent,
            Self::Failed,
            Self::Skipped,
            Self::Suppressed,
            Self::Cancelled,
            Self::Dead,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}
