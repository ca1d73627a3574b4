//! The local policy file: who may connect, and with which routes and DNS, when
//! `policy.source = "local"`.
//!
//! Format (TOML):
//!
//! ```toml
//! default = "deny"              # required: "allow" or "deny", for users in neither table
//!
//! [users.alice]
//! allow = true                  # required in every entry
//! routes = ["10.10.0.0/16"]     # CIDRs pushed to the client (admissions only)
//! no_routes = ["10.10.9.0/24"]  # CIDRs kept out of the tunnel (admissions only)
//! dns = ["10.10.0.53"]          # DNS servers (admissions only)
//!
//! [users.bob]
//! allow = false
//! reason = "contract ended"     # logged and answered with a denial
//!
//! [groups.staff]
//! allow = true
//! routes = ["10.20.0.0/16"]
//! ```
//!
//! Precedence: the user's entry, else the entry of the group ocserv gave, else `default`; an
//! entry is taken whole (a user entry's empty `routes` does not fall back to the group's).
//! `reason` is used only by denials, `routes`, `no_routes` and `dns` only by admissions, so an
//! entry switched to `allow = false` in a hurry needs no other edit.
//!
//! Inputs: the file's text ([`parse`]) or its path ([`load`]). Output: a [`LocalPolicy`] whose
//! [`LocalPolicy::decide`] never fails. Failure: a [`LocalPolicyError`] naming the file and
//! the key (`users.bob.routes[2]: invalid CIDR "10.0.0/8"`): syntax, unknown keys, wrong types,
//! unsafe user or group names ([`crate::validate::name`]), networks with host bits set.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::Decision;

/// Largest policy file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Longest denial reason, in bytes.
pub const MAX_REASON_LEN: usize = 512;

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LocalPolicyError {
    #[error("local policy {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local policy {}: larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("local policy {origin}: malformed TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("local policy {origin}: {key}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// What users in neither table get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultRule {
    Allow,
    Deny,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPolicy {
    default: DefaultRule,
    users: BTreeMap<String, Decision>,
    groups: BTreeMap<String, Decision>,
}

/// One `[users.NAME]` or `[groups.NAME]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default)]
    no_routes: Vec<String>,
    #[serde(default)]
    dns: Vec<String>,
}

impl LocalPolicy {
    /// The policy without a file: everyone that ocserv authenticated is admitted.
    pub fn admit_all() -> Self {
        Self {
            default: DefaultRule::Allow,
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }

    /// The decision for a user (in a group; `""` for none): the user's entry, else the group's,
    /// else the default.
    pub fn decide(&self, username: &str, groupname: &str) -> Decision {
        let group = || match groupname {
            "" => None,
            g => self.groups.get(g),
        };
        if let Some(d) = self.users.get(username).or_else(group) {
            return d.clone();
        }
        match self.default {
            DefaultRule::Allow => Decision::allow(),
            DefaultRule::Deny => Decision::deny("not allowed by the local policy (default deny)"),
        }
    }

    pub fn default_rule(&self) -> DefaultRule {
        self.default
    }

    /// The user entries by name, sorted (their routes and DNS become per-user files).
    pub fn users(&self) -> &BTreeMap<String, Decision> {
        &self.users
    }

    /// The group entries by name, sorted (their routes and DNS become per-group files).
    pub fn groups(&self) -> &BTreeMap<String, Decision> {
        &self.groups
    }
}

/// Reads and parses the policy file at `path` (a missing file is an error naming it).
pub fn load(path: &Path) -> Result<LocalPolicy, LocalPolicyError> {
    let read = |source| LocalPolicyError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    let mut limited = file.take(MAX_FILE_BYTES + 1);
    limited.read_to_string(&mut text).map_err(read)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(LocalPolicyError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(&text, &path.display().to_string())
}

/// Parses a policy from `text`; `origin` (the path, usually) names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<LocalPolicy, LocalPolicyError> {
    let invalid = |key: &str, reason: String| LocalPolicyError::Invalid {
        origin: origin.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| LocalPolicyError::Syntax {
                origin: origin.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            })?;
    let mut default = None;
    let mut policy = LocalPolicy::admit_all();
    for (key, value) in table {
        match key.as_str() {
            "default" => {
                let rule = DefaultRule::deserialize(value.clone());
                let why = || format!("expected \"allow\" or \"deny\", got {}", show(&value));
                default = Some(rule.map_err(|_| invalid("default", why()))?);
            }
            "users" | "groups" => {
                let toml::Value::Table(entries) = value else {
                    let why = format!("expected a table of {key} by name, got {}", show(&value));
                    return Err(invalid(&key, why));
                };
                let field = ["groupname", "username"][usize::from(key == "users")];
                for (name, entry) in entries {
                    let at = format!("{key}.{}", bare(&name));
                    crate::validate::name(field, &name).map_err(|e| invalid(&at, e.to_string()))?;
                    let decision = entry_decision(&at, entry).map_err(|(k, r)| invalid(&k, r))?;
                    match key.as_str() {
                        "users" => policy.users.insert(name, decision),
                        _ => policy.groups.insert(name, decision),
                    };
                }
            }
            other => {
                let why = "unknown key (expected one of: default, users, groups)".to_owned();
                return Err(invalid(other, why));
            }
        }
    }
    policy.default = default.ok_or_else(|| {
        let why = "missing: say what users in neither table get, \"allow\" or \"deny\"";
        invalid("default", why.to_owned())
    })?;
    Ok(policy)
}

/// One entry's decision, or the dotted key at fault and why.
fn entry_decision(at: &str, value: toml::Value) -> Result<Decision, (String, String)> {
    if !value.is_table() {
        return Err((
            at.to_owned(),
            format!("expected a table, got {}", show(&value)),
        ));
    }
    let raw = RawEntry::deserialize(value).map_err(|e| {
        // serde's message, e.g. "unknown field `alow`, expected one of ...".
        (at.to_owned(), e.message().trim_end().to_owned())
    })?;
    let nets = |field: &str, list: &[String]| -> Result<Vec<IpNet>, (String, String)> {
        let parse = |(i, s): (usize, &String)| {
            let key = format!("{at}.{field}[{i}]");
            let net: IpNet = s.trim().parse().map_err(|_| {
                (
                    key.clone(),
                    format!("invalid CIDR {s:?} (like \"10.0.0.0/8\")"),
                )
            })?;
            match net == net.trunc() {
                true => Ok(net),
                false => Err((
                    key,
                    format!("{s:?} has host bits set; did you mean \"{}\"?", net.trunc()),
                )),
            }
        };
        list.iter().enumerate().map(parse).collect()
    };
    let routes = nets("routes", &raw.routes)?;
    let no_routes = nets("no_routes", &raw.no_routes)?;
    let dns = raw.dns.iter().enumerate().map(|(i, s)| {
        let why = || {
            (
                format!("{at}.dns[{i}]"),
                format!("invalid IP address {s:?}"),
            )
        };
        s.trim().parse::<IpAddr>().map_err(|_| why())
    });
    let dns = dns.collect::<Result<Vec<_>, _>>()?;
    if let Some(reason) = &raw.reason {
        check_reason(reason).map_err(|why| (format!("{at}.reason"), why))?;
    }
    Ok(match raw.allow {
        true => Decision {
            allowed: true,
            reason: None,
            routes,
            no_routes,
            dns,
        },
        false => {
            let reason = raw
                .reason
                .unwrap_or_else(|| format!("denied by the local policy ({at})"));
            Decision::deny(reason)
        }
    })
}

/// A reason goes into logs and the hook's answer: one line, bounded.
fn check_reason(reason: &str) -> Result<(), String> {
    if reason.len() > MAX_REASON_LEN {
        let n = reason.len();
        return Err(format!("is {n} bytes long, the limit is {MAX_REASON_LEN}"));
    }
    match reason.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("must not contain {c:?}")),
        None => Ok(()),
    }
}

/// A table key as TOML would write it: bare when it can be, quoted otherwise.
fn bare(name: &str) -> String {
    let is_bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    match !name.is_empty() && name.chars().all(is_bare) {
        true => name.to_owned(),
        false => format!("{name:?}"),
    }
}

/// A TOML value in an error: its type, and the value when it is a scalar (strings cut short).
fn show(value: &toml::Value) -> String {
    use toml::Value as V;
    match value {
        V::String(s) if s.chars().count() > 40 => {
            format!("string {:?}...", s.chars().take(40).collect::<String>())
        }
        V::String(s) => format!("string {s:?}"),
        V::Integer(i) => format!("integer {i}"),
        V::Float(f) => format!("float {f}"),
        V::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: &str = r#"
        default = "deny"
        [users.alice]
        allow = true
        routes = ["10.10.0.0/16", "fd00::/64"]
        no_routes = ["10.10.9.0/24"]
        dns = ["10.10.0.53", "fd00::53"]
        [users.bob]
        allow = false
        reason = "contract ended"
        routes = ["10.99.0.0/16"]
        [users.carol]
        allow = true
        [groups.staff]
        allow = true
        routes = ["10.20.0.0/16"]
        [groups.banned]
        allow = false
        [groups."ops.team"]
        allow = true
        reason = "ignored for an admission"
    "#;

    fn policy() -> LocalPolicy {
        parse(POLICY, "test.toml").unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// `text` fails with the key and a reason containing `reason`.
    fn fails(text: &str, key: &str, reason: &str) {
        match parse(text, "p.toml") {
            Err(LocalPolicyError::Invalid {
                origin,
                key: k,
                reason: r,
            }) => {
                assert_eq!(
                    (origin.as_str(), k.as_str()),
                    ("p.toml", key),
                    "{text}: {r}"
                );
                assert!(r.contains(reason), "{text}: {k}: {r}");
            }
            other => panic!("{text}: expected an Invalid error naming {key}, got {other:?}"),
        }
    }

    #[test]
    fn user_wins_over_group_and_group_over_default() {
        let p = policy();
        let alice = p.decide("alice", "banned");
        assert!(alice.allowed, "the user entry wins over a denying group");
        assert_eq!(alice.routes, [net("10.10.0.0/16"), net("fd00::/64")]);
        assert_eq!(alice.no_routes, [net("10.10.9.0/24")]);
        let dns: Vec<IpAddr> = vec!["10.10.0.53".parse().unwrap(), "fd00::53".parse().unwrap()];
        assert_eq!((alice.dns, alice.reason), (dns, None));
        // Bob is denied whatever his group; a denial carries its reason and no routes.
        let bob = p.decide("bob", "staff");
        assert_eq!(
            (bob.allowed, bob.reason.as_deref()),
            (false, Some("contract ended"))
        );
        assert!(bob.routes.is_empty());
        // A user entry is taken whole: carol's admission has no routes of staff's.
        assert_eq!(p.decide("carol", "staff"), Decision::allow());
        // Without a user entry, the group decides.
        let dave = p.decide("dave", "staff");
        assert_eq!(
            (dave.allowed, dave.routes),
            (true, vec![net("10.20.0.0/16")])
        );
        let erin = p.decide("erin", "banned");
        assert!(!erin.allowed);
        assert_eq!(
            erin.reason.as_deref(),
            Some("denied by the local policy (groups.banned)")
        );
        assert_eq!(p.decide("frank", "ops.team"), Decision::allow());
        // Neither: the default.
        let nobody = p.decide("nobody", "");
        assert!(!nobody.allowed && nobody.reason.unwrap().contains("default deny"));
        assert!(!p.decide("nobody", "unknown-group").allowed);
        // Names match exactly: no prefix, no case folding.
        assert!(!p.decide("alic", "").allowed && !p.decide("Alice", "").allowed);
        assert!(!p.decide("alice2", "").allowed);
    }

    #[test]
    fn default_allow_and_admit_all() {
        let p = parse("default = \"allow\"\n[users.bob]\nallow = false\n", "x").unwrap();
        assert_eq!(
            (p.default_rule(), p.decide("anyone", "g")),
            (DefaultRule::Allow, Decision::allow())
        );
        assert!(!p.decide("bob", "").allowed);
        let all = LocalPolicy::admit_all();
        assert_eq!(all.decide("anyone", ""), Decision::allow());
        assert!(all.users().is_empty() && all.groups().is_empty());
        let p = policy();
        let users: Vec<&str> = p.users().keys().map(String::as_str).collect();
        assert_eq!(users, ["alice", "bob", "carol"]);
        assert_eq!(p.groups().len(), 3);
    }

    #[rustfmt::skip]
    #[test]
    fn every_error_names_its_key() {
        fails("", "default", "missing");
        fails("default = \"maybe\"\n", "default", "expected \"allow\" or \"deny\", got string \"maybe\"");
        fails("default = true\n", "default", "got boolean true");
        fails("default = \"allow\"\nuser = {}\n", "user", "unknown key (expected one of: default, users, groups)");
        fails("default = \"allow\"\nusers = 5\n", "users", "expected a table of users by name, got integer 5");
        fails("default = \"allow\"\nusers = { bob = 1 }\n", "users.bob", "expected a table, got integer 1");
        fails("default = \"allow\"\n[users.bob]\nalow = true\n", "users.bob", "unknown field `alow`");
        fails("default = \"allow\"\n[users.bob]\nroutes = []\n", "users.bob", "missing field `allow`");
        fails("default = \"allow\"\n[users.bob]\nallow = \"yes\"\n", "users.bob", "invalid type");
        fails("default = \"allow\"\n[users.bob]\nallow = true\nroutes = \"10.0.0.0/8\"\n", "users.bob", "invalid type");
        fails("default = \"allow\"\n[users.bob]\nallow = true\nroutes = [\"10.0.0.0/8\", \"10.1.0.0/16\", \"10.0.0/8\"]\n", "users.bob.routes[2]", "invalid CIDR \"10.0.0/8\"");
        fails("default = \"allow\"\n[users.bob]\nallow = true\nroutes = [\"10.0.0.1\"]\n", "users.bob.routes[0]", "invalid CIDR");
        fails("default = \"allow\"\n[users.bob]\nallow = true\nroutes = [\"10.1.2.3/8\"]\n", "users.bob.routes[0]", "did you mean \"10.0.0.0/8\"?");
        fails("default = \"allow\"\n[groups.staff]\nallow = true\nno_routes = [\"x\"]\n", "groups.staff.no_routes[0]", "invalid CIDR \"x\"");
        fails("default = \"allow\"\n[groups.staff]\nallow = true\ndns = [\"1.1.1.1\", \"dns.example\"]\n", "groups.staff.dns[1]", "invalid IP address \"dns.example\"");
        fails("default = \"allow\"\n[users.bob]\nallow = false\nreason = \"a\\nb\"\n", "users.bob.reason", "must not contain '\\n'");
        let long = format!("default = \"allow\"\n[users.bob]\nallow = false\nreason = \"{}\"\n", "x".repeat(513));
        fails(&long, "users.bob.reason", "the limit is 512");
        // Unsafe names are refused, named as TOML would write them.
        fails("default = \"allow\"\n[users.\"../etc\"]\nallow = true\n", "users.\"../etc\"", "invalid username");
        fails("default = \"allow\"\n[users.\"-rf\"]\nallow = true\n", "users.-rf", "must not start with '-'");
        fails("default = \"allow\"\n[groups.\".hidden\"]\nallow = true\n", "groups.\".hidden\"", "invalid groupname");
        fails("default = \"allow\"\n[groups.\"\"]\nallow = true\n", "groups.\"\"", "must not be empty");
        fails("default = \"allow\"\n[users.\"a\\u0000b\"]\nallow = true\n", "users.\"a\\0b\"", "must not contain");
    }

    #[test]
    fn syntax_errors_name_the_origin_and_line() {
        let e = parse("default = \"allow\"\n[users.bob\n", "p.toml").unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, LocalPolicyError::Syntax { .. }), "{text}");
        assert!(
            text.starts_with("local policy p.toml: malformed TOML") && text.contains("line 2"),
            "{text}"
        );
        // A duplicate user is a TOML error too, never "last one wins".
        let dup = "default = \"allow\"\n[users.bob]\nallow = true\n[users.bob]\nallow = false\n";
        assert!(matches!(
            parse(dup, "p"),
            Err(LocalPolicyError::Syntax { .. })
        ));
    }

    #[test]
    fn error_display_names_file_key_and_reason() {
        let e = parse(
            "default = \"allow\"\n[users.bob]\nallow = true\nroutes = [\"10.0.0/8\"]\n",
            "/etc/p.toml",
        );
        let text = e.unwrap_err().to_string();
        assert_eq!(text, "local policy /etc/p.toml: users.bob.routes[0]: invalid CIDR \"10.0.0/8\" (like \"10.0.0.0/8\")");
    }

    #[test]
    fn load_reads_the_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let e = load(&path).unwrap_err();
        assert!(
            matches!(&e, LocalPolicyError::Read { path: p, .. } if *p == path),
            "{e}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        std::fs::write(&path, POLICY).unwrap();
        assert_eq!(load(&path).unwrap(), policy());
        std::fs::write(&path, "default = \"allow\"\n[users.bob]\nallow = 1\n").unwrap();
        match load(&path).unwrap_err() {
            LocalPolicyError::Invalid { origin, key, .. } => {
                assert_eq!(
                    (origin, key.as_str()),
                    (path.display().to_string(), "users.bob")
                );
            }
            other => panic!("{other}"),
        }
        // A directory is not a policy file.
        assert!(matches!(
            load(dir.path()),
            Err(LocalPolicyError::Read { .. })
        ));
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(matches!(
            load(&path),
            Err(LocalPolicyError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn decide_never_panics_and_follows_precedence(
            username in ".{0,40}",
            groupname in ".{0,40}",
            user_listed in any::<bool>(),
            group_listed in any::<bool>(),
            user_allow in any::<bool>(),
            group_allow in any::<bool>(),
            default_allow in any::<bool>(),
        ) {
            let mut p = LocalPolicy::admit_all();
            p.default = [DefaultRule::Deny, DefaultRule::Allow][usize::from(default_allow)];
            let entry = |allow: bool| match allow {
                true => Decision::allow(),
                false => Decision::deny("x"),
            };
            if user_listed {
                p.users.insert(username.clone(), entry(user_allow));
            }
            if group_listed {
                p.groups.insert(groupname.clone(), entry(group_allow));
            }
            let d = p.decide(&username, &groupname);
            let expected = match (user_listed, group_listed && !groupname.is_empty()) {
                (true, _) => user_allow,
                (false, true) => group_allow,
                (false, false) => default_allow,
            };
            prop_assert_eq!(d.allowed, expected);
            prop_assert_eq!(d.reason.is_some(), !d.allowed);
        }

        #[test]
        fn parse_never_panics(text in ".{0,300}") {
            let _ = parse(&text, "fuzz");
        }
    }
}
