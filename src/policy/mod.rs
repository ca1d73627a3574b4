//! Connect-time policy as plain data and rules (DESIGN §2: decision logic outside the actors).
//!
//! - [`Decision`]: what a connect gets (admit or deny, the denial's reason, and for an admission
//!   the routes, no-routes and DNS servers that become the user's per-user config).
//! - [`Source`]: where an answer came from; one enum for the hook protocol and the metrics.
//! - [`FailMode`]: what is answered when the portal cannot be asked.
//! - [`cache`]: freshness of cached decisions, the fail-mode resolution, the bounded store and
//!   the single-flight bookkeeping.
//! - [`local`]: the local policy file, its validation and evaluation.
//!
//! Nothing here does I/O except [`local::load`] (one file read), and nothing panics on input.

pub mod cache;
pub mod local;

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A decision and where it came from: what the hook listener answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub source: Source,
}

/// The verdict from what is at hand, without asking the portal: the local policy's decision
/// for `source = "local"`; for `source = "portal"`, what the fail mode promises given the cached
/// entry (a fresh entry is served as `cached`). Used by the cache when the portal fails, and by
/// the hook listener when the cache itself cannot answer in time.
pub fn without_portal(
    source: crate::config::PolicySource,
    fail_mode: FailMode,
    lifetimes: &cache::Lifetimes,
    local: &local::LocalPolicy,
    cached: Option<&cache::Entry>,
    (username, groupname): (&str, &str),
    now: std::time::Instant,
) -> Verdict {
    match source {
        crate::config::PolicySource::Local => Verdict {
            decision: local.decide(username, groupname),
            source: Source::LocalPolicy,
        },
        crate::config::PolicySource::Portal => {
            let (decision, source) = cache::on_portal_failure(fail_mode, cached, now, lifetimes);
            Verdict { decision, source }
        }
    }
}

/// The answer to "may this user connect?".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    /// Why a connect was denied (shown in logs and the hook's answer); `None` for admissions.
    pub reason: Option<String>,
    /// Routes pushed to the client (ocserv `route`); admissions only.
    pub routes: Vec<IpNet>,
    /// Networks excluded from the tunnel (ocserv `no-route`); admissions only.
    pub no_routes: Vec<IpNet>,
    /// DNS servers pushed to the client (ocserv `dns`); admissions only.
    pub dns: Vec<IpAddr>,
}

impl Decision {
    /// An admission without routes or DNS of its own.
    pub fn allow() -> Self {
        Self {
            allowed: true,
            ..Self::default()
        }
    }

    /// A denial with its reason.
    pub fn deny(reason: impl Into<String>) -> Self {
        Self {
            allowed: false,
            reason: Some(reason.into()),
            ..Self::default()
        }
    }

    /// `"allow"` or `"deny"`: the `decision` label of `ocserv_agent_hook_decisions_total`.
    pub fn label(&self) -> &'static str {
        match self.allowed {
            true => "allow",
            false => "deny",
        }
    }
}

/// Where an answer came from: the `source` field of the hook protocol's response (contract §2)
/// and the `source` label of `ocserv_agent_hook_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Just asked of the portal for this request.
    Fresh,
    /// A cached portal decision within its fresh lifetime.
    Cached,
    /// A cached portal decision past its fresh lifetime, used because the portal failed or the
    /// breaker is open (`fail_mode = "stale"`).
    Stale,
    /// Admitted because the portal could not be asked (`fail_mode = "open"`).
    FailOpen,
    /// Denied because the portal could not be asked and no usable decision was cached.
    FailClosed,
    /// Decided by the local policy (the file, or its absence: everyone admitted).
    LocalPolicy,
}

impl Source {
    /// Every source, for metric pre-registration and tests.
    pub const ALL: [Source; 6] = [
        Self::Fresh,
        Self::Cached,
        Self::Stale,
        Self::FailOpen,
        Self::FailClosed,
        Self::LocalPolicy,
    ];

    /// The wire and metric-label spelling (the same as serde's).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Cached => "cached",
            Self::Stale => "stale",
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
            Self::LocalPolicy => "local_policy",
        }
    }

    /// The source spelled `text` on the wire, if any.
    pub fn from_wire(text: &str) -> Option<Source> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// What a connect gets when the portal fails or the breaker is open (`policy.fail_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// A stale cached decision when there is one, else deny.
    Stale,
    /// Admit.
    Open,
    /// Deny.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_spellings_agree_with_serde() {
        for s in Source::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), s);
        }
        let names = Source::ALL.map(|s| s.as_str());
        let expected = [
            "fresh",
            "cached",
            "stale",
            "fail_open",
            "fail_closed",
            "local_policy",
        ];
        assert_eq!(names, expected);
    }

    #[test]
    fn decision_constructors_and_labels() {
        let (a, d) = (Decision::allow(), Decision::deny("no"));
        assert_eq!(
            (a.allowed, a.reason.as_deref(), a.label()),
            (true, None, "allow")
        );
        assert_eq!(
            (d.allowed, d.reason.as_deref(), d.label()),
            (false, Some("no"), "deny")
        );
        assert!(a.routes.is_empty() && a.no_routes.is_empty() && a.dns.is_empty());
    }

    #[test]
    fn fail_mode_spellings() {
        let modes: Vec<FailMode> = serde_json::from_str(r#"["stale","open","closed"]"#).unwrap();
        assert_eq!(modes, [FailMode::Stale, FailMode::Open, FailMode::Closed]);
        assert!(serde_json::from_str::<FailMode>(r#""Open""#).is_err());
    }
}
