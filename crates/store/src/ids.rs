//! The ids herald makes for what it stores, each a type of its own: a run's id cannot be passed
//! where a message's is expected, nor a lease token for either. Stored and serialised as the
//! text they wrap.

use std::borrow::Borrow;
use std::fmt;

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize,
            serde::Deserialize, sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// Read by the SQLite writer as the text it is stored as (`sqlx(transparent)` for the
        /// readers).
        impl rusqlite::types::FromSql for $name {
            fn column_result(
                value: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                String::column_result(value).map(Self)
            }
        }

        /// An id read from elsewhere: a request's path, a stored row, a test.
        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Read as the text it is wherever text is read (SQL parameters, `Option::as_deref`);
        /// one id type still never stands in for another.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by id are looked up by `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        /// As the text it is (`"0193…"`), so errors and logs that quote an id read as before.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_id! {
    /// A contact (learner), as the course platform names it.
    ContactId
}

text_id! {
    /// A workflow, as its YAML file names it (`id:`).
    WorkflowId
}

text_id! {
    /// A workflow run.
    RunId
}

text_id! {
    /// A message a run's send step created (herald's id, not its `Message-ID` header).
    MessageId
}

text_id! {
    /// The token of one claim: the claimed rows carry it, and a result is written only while
    /// its row still does (the lease held).
    LeaseToken
}

/// A fresh id that sorts after every id this process made before it (UUIDv7: uuid guarantees
/// the order within a process), for what the admin API pages through by id.
fn time_ordered() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl RunId {
    pub fn fresh() -> Self {
        Self(time_ordered())
    }
}

impl MessageId {
    pub fn fresh() -> Self {
        Self(time_ordered())
    }
}

impl LeaseToken {
    /// Random: a claim's token says nothing of when it was made.
    pub(crate) fn fresh() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn an_id_reads_writes_and_looks_up_as_its_text() {
        let id = RunId::from("run_1");
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""run_1""#);
        assert_eq!(serde_json::from_str::<RunId>(r#""run_1""#).unwrap(), id);
        assert_eq!(format!("{id} {id:?}"), r#"run_1 "run_1""#);
        let runs = HashMap::from([(id.clone(), 7)]);
        assert_eq!(runs.get("run_1"), Some(&7));
        let text = String::from("run_1");
        assert!(id == "run_1" && id == *"run_1" && id == text);
    }

    #[test]
    fn fresh_ids_differ_and_runs_and_messages_sort_by_creation() {
        let (a, b) = (RunId::fresh(), RunId::fresh());
        assert!(a < b, "UUIDv7 ids sort by creation: {a} then {b}");
        let (m, n) = (MessageId::fresh(), MessageId::fresh());
        assert!(m < n, "{m} then {n}");
        assert_ne!(LeaseToken::fresh(), LeaseToken::fresh());
    }
}
