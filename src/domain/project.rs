//! Git projects managed across the nodes, and their state on each node.

use serde::{Deserialize, Serialize};

/// Where a project (or its copy on one node) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum CloneStatus {
    Pending,
    Cloning,
    Cloned,
    Failed,
    Propagating,
    Synced,
}

impl CloneStatus {
    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            CloneStatus::Pending => "pending",
            CloneStatus::Cloning => "cloning",
            CloneStatus::Cloned => "cloned",
            CloneStatus::Failed => "failed",
            CloneStatus::Propagating => "propagating",
            CloneStatus::Synced => "synced",
        }
    }

    /// The project is on the node (cloned, or brought up to date since).
    pub fn is_present(self) -> bool {
        matches!(self, CloneStatus::Cloned | CloneStatus::Synced)
    }
}

/// A row of `managed_projects`, serialized as the upstream runtime's `ManagedProject`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub repo_url: String,
    /// `sha256(name)`, first 16 hex characters: the id membridge and its agents use.
    pub canonical_id: String,
    pub target_path: Option<String>,
    pub clone_status: CloneStatus,
    pub primary_node_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub error_message: Option<String>,
}

/// A row of `project_node_status`: one project on one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProjectNode {
    pub id: String,
    pub project_id: String,
    pub node_id: String,
    pub clone_status: CloneStatus,
    pub last_sync_at: Option<i64>,
    pub error_message: Option<String>,
    pub repo_path: Option<String>,
}

/// A project to create (the body of `POST /api/runtime/projects`, validated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = CreateProject)]
pub struct NewProject {
    /// 1–256 characters: letters, digits, `_ - .` and spaces.
    #[schema(min_length = 1, max_length = 256, pattern = "^[A-Za-z0-9_.\\- ]+$")]
    pub name: String,
    /// `http(s)://...` or `git@...`, at most 1024 characters.
    #[schema(min_length = 1, max_length = 1024, pattern = "^(https?://|git@).+$")]
    pub repo_url: String,
    /// At most 512 characters: letters, digits, `_ - . / ~`; no `..`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 512, pattern = "^[A-Za-z0-9_.\\-/~]+$")]
    pub target_path: Option<String>,
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    pub primary_node_id: Option<String>,
}

/// The id membridge and its agents give a project: `sha256(name)`, first 16 hex
/// characters.
pub fn canonical_id(name: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(name.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_id_is_the_first_16_hex_characters_of_the_names_sha256() {
        // sha256("demo") = 2a97516c354b68848cdbd8f54a226a0a55b21ed138e207ad6c5cbb9c00aa5aea
        assert_eq!(canonical_id("demo"), "2a97516c354b6884");
    }
}
