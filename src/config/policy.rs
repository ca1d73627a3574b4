//! `[policy]`: where connect decisions come from, how long they are kept, and what is answered
//! when the portal cannot be asked (the cache rules themselves are in [`crate::policy::cache`]).

use super::*;
use crate::policy::FailMode;

/// Where connect decisions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    /// The local policy file (`[local_policy] path`); none: everyone ocserv authenticated.
    Local,
    /// The central portal's `vpn.v1.AuthService.CheckPolicy` (`[portal]`), cached.
    Portal,
}

section! {
    "policy" => pub struct PolicyConfig {
        /// `local`: the policy file of `[local_policy]` decides; `portal`: the portal decides
        /// (needs `portal.endpoint`), behind the decision cache and the circuit breaker.
        source: PolicySource = PolicySource::Local,
        /// What a connect gets when the portal fails or the breaker is open: `stale` answers
        /// from a stale cached decision when there is one and denies otherwise; `open` admits;
        /// `closed` denies.
        fail_mode: FailMode = FailMode::Stale,
        /// How long a portal admission is served from the cache without asking again (it is
        /// refreshed in the background once 80 % of this has passed and the key is used).
        #[serde(with = "human")] allow_ttl: Duration = secs(300), in secs(1)..=secs(86_400),
        /// How long a portal denial is served from the cache; shorter than `allow_ttl` so a
        /// user the portal re-enables gets in soon.
        #[serde(with = "human")] deny_ttl: Duration = secs(30), in secs(1)..=secs(86_400),
        /// How long past its fresh lifetime a decision may still be used, and only when the
        /// portal fails or the breaker is open with `fail_mode = "stale"`; `0s`: never.
        #[serde(with = "human")] stale_for: Duration = secs(3600), in secs(0)..=secs(604_800),
        /// Cached decisions (one per username and groupname) kept at most; the least recently
        /// used goes first.
        capacity: usize = 10_000, in 1..=10_000_000,
    }
}

impl PolicyConfig {
    fn rules(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// The cache lifetimes of this section.
    pub fn lifetimes(&self) -> crate::policy::cache::Lifetimes {
        crate::policy::cache::Lifetimes {
            allow_ttl: self.allow_ttl,
            deny_ttl: self.deny_ttl,
            stale_for: self.stale_for,
        }
    }
}
