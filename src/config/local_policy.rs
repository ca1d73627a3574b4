//! `[local_policy]`: the local policy file, used when `policy.source = "local"` (its format and
//! evaluation are in [`crate::policy::local`]).

use super::*;

section! {
    "local_policy" => pub struct LocalPolicyConfig {
        /// The policy file (TOML: `default`, `[users.NAME]`, `[groups.NAME]`), re-read on
        /// SIGHUP (an invalid one keeps the running policy). Not set: there is no policy file
        /// and every user that ocserv authenticated is admitted. An absolute path.
        path: Option<PathBuf> = None,
    }
}

impl LocalPolicyConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        match &self.path {
            Some(p) => absolute("local_policy.path", p),
            None => Ok(()),
        }
    }

    /// What this section means for connects, in one line for the start-up log and
    /// `check-config` (whatever `policy.source` is, the caller says whether it applies).
    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("local policy file {}", p.display()),
            None => "no local policy file (local_policy.path is not set): every user that \
                     ocserv authenticated is admitted"
                .to_owned(),
        }
    }
}
