//! Artifacts: the stored output of a task, in S3 (`url`) or inline in Postgres (`content`).

use serde::{Deserialize, Serialize};

use super::ids::{ArtifactId, TaskId};

/// A row of `runtime_artifacts`, serialized exactly as the seed's `RuntimeArtifact`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Artifact {
    pub id: ArtifactId,
    pub task_id: TaskId,
    pub job_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: i64,
    pub finalized: bool,
    pub url: Option<String>,
    pub entity_refs: Vec<String>,
    pub tags: Vec<String>,
    pub content: Option<String>,
}

/// Where an artifact's content went.
#[derive(Clone, Debug, PartialEq)]
pub enum ArtifactBody {
    /// Uploaded to S3: the object's URL.
    S3 { url: String },
    /// Kept in Postgres: the artifact's content is the result's output (written once to
    /// the statement, not twice).
    Inline,
}
