//! Identifier newtypes. Ids are strings in the schema (`varchar`), as in the original
//! service, so ids that clients invent (worker names) and generated UUIDs share one type.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
                 serde::Serialize, serde::Deserialize, sqlx::Type, utoipa::ToSchema)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A new id (see [`new_id`]).
            pub fn generate() -> Self {
                Self(new_id())
            }
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

id_type!(
    /// Id of an `llm_tasks` row.
    TaskId
);
id_type!(
    /// Id of a `leases` row.
    LeaseId
);
id_type!(
    /// Id of a `workers` row: the worker's name.
    WorkerId
);
id_type!(
    /// Id of a `runtime_artifacts` row.
    ArtifactId
);
id_type!(
    /// Id of an `llm_results` row.
    ResultId
);

/// A new id in the seed's format (a hyphenated UUID). Version 7: time-ordered, so the
/// primary-key indexes of insert-heavy tables grow at their right edge instead of
/// splitting pages all over the tree.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
