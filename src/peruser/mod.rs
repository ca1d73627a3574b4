//! A typed model of one ocserv config-per-user or config-per-group file (DESIGN §2 ConfigWriter,
//! §5 security; facts in `reference/ocserv.md` §4).
//!
//! Role: the portal pushes routes, DNS and limits for a user or a group; this module turns them
//! into a [`PerUserConfig`] of typed values (networks as [`ipnet::IpNet`], addresses as
//! [`std::net::IpAddr`], domain names as [`DomainName`], numbers, booleans), checks the bounds
//! ocserv cannot check for itself ([`PerUserConfig::validate`]), renders it in ocserv's syntax
//! ([`render`]) and reads such a file back ([`parse`]). [`write`] puts the rendered text on disk
//! atomically, with a ring of backups.
//!
//! Why typed values: ocserv copies `iroute` values into a root shell command (`route-add-cmd`)
//! and rejects a whole session on one bad `route`. Nothing here is ever copied as text: every
//! value is parsed into a type whose `Display` cannot produce a newline, `=`, `#` or NUL, so a
//! rendered file holds exactly one `key = value` line per value of the model.
//!
//! Keys modelled, in ocserv 1.1.6 spelling:
//! `route`, `no-route`, `iroute` (networks); `dns`, `nbns` (addresses; the `ipv4-`/`ipv6-`
//! aliases are read, never written); `split-dns`, `hostname` (domain names); `tunnel_all_dns`
//! (underscore: the hyphenated spelling is ignored by 1.1.6); `ipv4-network` + `ipv4-netmask`
//! (one [`ipnet::Ipv4Net`], written as address and netmask, the form every ocserv reads);
//! `ipv6-network`, `ipv6-subnet-prefix`, `explicit-ipv4`, `explicit-ipv6`;
//! `restrict-user-to-routes`, `deny-roaming`, `no-udp` (booleans); `rx-data-per-sec`,
//! `tx-data-per-sec` (bytes/s), `session-timeout`, `idle-timeout`, `mobile-idle-timeout`,
//! `stats-report-time` (seconds), `mtu`, `dpd`, `mobile-dpd`, `keepalive`, `max-same-clients`.
//!
//! Keys left out, and why: `restrict-user-to-ports` (a small language of its own; a mistake in
//! it rejects the session), `user-profile` (a path ocserv opens), `cgroup` (a path; removed in
//! 1.5.0), `net-priority` (ocserv reads a decimal priority or a `0x` TOS with different meanings
//! and no range check) and `ipv6-prefix` (superseded by the prefix of `ipv6-network`). A file
//! holding any of them is refused by [`parse`] rather than silently dropped on the next write.
//!
//! Decisions:
//! - Networks must have no host bits set (`10.0.0.0/24`, not `10.0.0.1/24`): `iroute` ends up in
//!   `ip route add`, which refuses host bits, and a route with host bits is most likely a typo.
//!   They are refused, not silently truncated, so the portal sees its mistake.
//! - Full tunnel is "no `route` lines" (ocserv's `route = default` is not modelled).
//! - An empty model renders the header only. That file is not the same as no file: without a
//!   file ocserv falls back to `default-user-config`/`default-group-config`, with an empty file
//!   it applies nothing. Removing the file is [`write::Writer::remove`].
//! - Lists may not repeat a value (a repeated `iroute` makes the second `route-add-cmd` fail).
//!
//! Failure behaviour: every refusal is a [`PerUserError`] naming the ocserv key (and the line,
//! when parsing) and the reason; nothing is ever truncated or dropped to make input fit.

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::validate::{self, NameError};

mod text;
pub mod write;

pub use text::{parse, render, HEADER, MAX_FILE_BYTES};

/// Most entries in each of `route`, `no-route` and `iroute`.
pub const MAX_ROUTES: usize = 1024;
/// Most entries in each of `dns` and `nbns`.
pub const MAX_SERVERS: usize = 16;
/// Most entries in `split-dns`.
pub const MAX_SPLIT_DNS: usize = 256;
/// Longest domain name, in bytes (RFC 1035, without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest domain label, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Whether a file is a config-per-user or a config-per-group file. The kind names the field in
/// errors (`username` / `groupname`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    User,
    Group,
}

impl Kind {
    /// The field a name of this kind is reported as.
    pub fn field(self) -> &'static str {
        match self {
            Kind::User => "username",
            Kind::Group => "groupname",
        }
    }

    /// Checks that `name` may be the file name of this kind's config file
    /// ([`validate::file_name`]).
    pub fn check_name(self, name: &str) -> Result<(), NameError> {
        validate::file_name(self.field(), name)
    }
}

/// Why a config was refused: the ocserv key (or the line of a parsed file) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PerUserError {
    /// A value, or a list of values, of one key is out of bounds or malformed.
    #[error("invalid {key}{}: {reason}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        key: &'static str,
        /// The line of the parsed file the value came from; `None` for a model built in code.
        line: Option<usize>,
        reason: String,
    },
    /// A parsed line is not a `key = value` line of a modelled key, or the file is too large.
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
}

impl PerUserError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        PerUserError::Invalid {
            key,
            line: None,
            reason: reason.into(),
        }
    }
}

/// A DNS name accepted by `split-dns` and `hostname`: labels of 1 to 63 bytes from
/// `A-Z a-z 0-9 -`, not starting or ending with `-`, separated by single dots, at most 253
/// bytes, no trailing dot. Case is kept as given.
///
/// The only way to build one is [`DomainName::new`] (or `parse`/`TryFrom`), so a value holding
/// a space, `=`, `#`, a newline or NUL cannot exist.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

/// Why a domain name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DomainNameError(String);

impl DomainName {
    pub fn new(value: &str) -> Result<Self, DomainNameError> {
        let err = |reason: String| Err(DomainNameError(reason));
        if value.is_empty() {
            return err("must not be empty".into());
        }
        if value.len() > MAX_DOMAIN_LEN {
            return err(format!(
                "is {} bytes long, the limit is {MAX_DOMAIN_LEN}",
                value.len()
            ));
        }
        for label in value.split('.') {
            if label.is_empty() {
                return err(format!("{value:?} has an empty label"));
            }
            if label.len() > MAX_LABEL_LEN {
                return err(format!(
                    "label {label:?} is {} bytes long, the limit is {MAX_LABEL_LEN}",
                    label.len()
                ));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
            {
                return err(format!(
                    "must contain only A-Z a-z 0-9 '-' '.', found {c:?}"
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return err(format!("label {label:?} must not start or end with '-'"));
            }
        }
        Ok(DomainName(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DomainName {
    type Err = DomainNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DomainName::new(s)
    }
}

impl TryFrom<&str> for DomainName {
    type Error = DomainNameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        DomainName::new(s)
    }
}

/// One config-per-user or config-per-group file. `None` (or an empty list) means "not in the
/// file": for a user file, the group file's or ocserv's own value then applies.
///
/// Fields are public plain data so callers can build a model from a request; the type of each
/// field makes text injection impossible, and [`PerUserConfig::validate`] checks the bounds
/// (list lengths, numeric ranges, host bits, duplicates) before anything is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerUserConfig {
    /// `route`: networks the client sends through the tunnel.
    pub routes: Vec<IpNet>,
    /// `no-route`: networks the client keeps outside the tunnel.
    pub no_routes: Vec<IpNet>,
    /// `iroute`: networks behind this client, routed to it by the server (`route-add-cmd`).
    pub iroutes: Vec<IpNet>,
    /// `dns`: DNS servers pushed to the client.
    pub dns: Vec<IpAddr>,
    /// `nbns`: NetBIOS name servers pushed to the client.
    pub nbns: Vec<IpAddr>,
    /// `split-dns`: domains resolved through the tunnel's DNS servers.
    pub split_dns: Vec<DomainName>,
    /// `tunnel_all_dns`: send every DNS query through the tunnel.
    pub tunnel_all_dns: Option<bool>,
    /// `ipv4-network` and `ipv4-netmask`: the pool the client's IPv4 address comes from.
    pub ipv4_network: Option<Ipv4Net>,
    /// `ipv6-network`: the pool the client's IPv6 address comes from.
    pub ipv6_network: Option<Ipv6Net>,
    /// `ipv6-subnet-prefix`: prefix length of the network given to each client.
    pub ipv6_subnet_prefix: Option<u8>,
    /// `explicit-ipv4`: a fixed IPv4 address for this user.
    pub explicit_ipv4: Option<Ipv4Addr>,
    /// `explicit-ipv6`: a fixed IPv6 address for this user.
    pub explicit_ipv6: Option<Ipv6Addr>,
    /// `hostname`: the host name announced to the client.
    pub hostname: Option<DomainName>,
    /// `restrict-user-to-routes`: drop the client's traffic outside its routes (ocserv-fw).
    pub restrict_user_to_routes: Option<bool>,
    /// `deny-roaming`: refuse a cookie reused from another address.
    pub deny_roaming: Option<bool>,
    /// `no-udp`: no DTLS channel, TLS only.
    pub no_udp: Option<bool>,
    /// `rx-data-per-sec`: bytes per second the client may send; 0 = unlimited.
    pub rx_data_per_sec: Option<u32>,
    /// `tx-data-per-sec`: bytes per second the client may receive; 0 = unlimited.
    pub tx_data_per_sec: Option<u32>,
    /// `session-timeout`: seconds before a session is closed; 0 = unlimited.
    pub session_timeout: Option<u32>,
    /// `idle-timeout`: seconds without traffic before a session is closed; 0 = unlimited.
    pub idle_timeout: Option<u32>,
    /// `mobile-idle-timeout`: `idle-timeout` for mobile clients.
    pub mobile_idle_timeout: Option<u32>,
    /// `stats-report-time`: seconds between interim statistics reports; 0 = none.
    pub stats_report_time: Option<u32>,
    /// `mtu`: the tunnel MTU.
    pub mtu: Option<u32>,
    /// `dpd`: dead peer detection interval, seconds.
    pub dpd: Option<u32>,
    /// `mobile-dpd`: `dpd` for mobile clients.
    pub mobile_dpd: Option<u32>,
    /// `keepalive`: keepalive interval, seconds.
    pub keepalive: Option<u32>,
    /// `max-same-clients`: most simultaneous sessions of this user; 0 = unlimited.
    pub max_same_clients: Option<u32>,
}

/// A boolean key: its ocserv spelling and the field behind it. One table serves render, parse
/// and the tests, so a key's spelling is written once.
pub(crate) struct BoolKey {
    pub key: &'static str,
    pub get: fn(&PerUserConfig) -> Option<bool>,
    pub set: fn(&mut PerUserConfig, bool),
}

/// Boolean keys in render order.
pub(crate) const BOOL_KEYS: &[BoolKey] = &[
    BoolKey {
        key: "tunnel_all_dns",
        get: |c| c.tunnel_all_dns,
        set: |c, v| c.tunnel_all_dns = Some(v),
    },
    BoolKey {
        key: "restrict-user-to-routes",
        get: |c| c.restrict_user_to_routes,
        set: |c, v| c.restrict_user_to_routes = Some(v),
    },
    BoolKey {
        key: "deny-roaming",
        get: |c| c.deny_roaming,
        set: |c, v| c.deny_roaming = Some(v),
    },
    BoolKey {
        key: "no-udp",
        get: |c| c.no_udp,
        set: |c, v| c.no_udp = Some(v),
    },
];

/// A numeric key: its ocserv spelling, the field behind it and its own validator.
pub(crate) struct NumKey {
    pub key: &'static str,
    pub get: fn(&PerUserConfig) -> Option<u32>,
    pub set: fn(&mut PerUserConfig, u32),
    pub check: fn(u32) -> Result<(), String>,
}

/// One year, the longest timeout accepted.
const YEAR_SECS: u32 = 365 * 24 * 3600;
/// One day, the longest interval (DPD, keepalive, statistics) accepted.
const DAY_SECS: u32 = 24 * 3600;

fn at_most(v: u32, max: u32) -> Result<(), String> {
    if v <= max {
        Ok(())
    } else {
        Err(format!("{v} is above the limit {max}"))
    }
}

/// ocserv divides a rate by 1000 and keeps the quotient, so 1..=999 silently mean
/// "unlimited". The value itself is stored in 32 bits before dividing, hence `u32`.
fn rate(v: u32) -> Result<(), String> {
    if (1..1000).contains(&v) {
        Err(format!(
            "{v} bytes/s would mean unlimited to ocserv (it counts whole kB/s): use 0 for \
             unlimited or at least 1000"
        ))
    } else {
        Ok(())
    }
}

/// A tunnel MTU: IPv4's minimum (576) up to a jumbo frame (9000); the tunnel travels inside
/// packets no larger than the path MTU, so anything above is never usable.
fn mtu(v: u32) -> Result<(), String> {
    if (576..=9000).contains(&v) {
        Ok(())
    } else {
        Err(format!("{v} is outside 576..=9000"))
    }
}

/// Numeric keys in render order.
pub(crate) const NUM_KEYS: &[NumKey] = &[
    NumKey {
        key: "rx-data-per-sec",
        get: |c| c.rx_data_per_sec,
        set: |c, v| c.rx_data_per_sec = Some(v),
        check: rate,
    },
    NumKey {
        key: "tx-data-per-sec",
        get: |c| c.tx_data_per_sec,
        set: |c, v| c.tx_data_per_sec = Some(v),
        check: rate,
    },
    NumKey {
        key: "session-timeout",
        get: |c| c.session_timeout,
        set: |c, v| c.session_timeout = Some(v),
        check: |v| at_most(v, YEAR_SECS),
    },
    NumKey {
        key: "idle-timeout",
        get: |c| c.idle_timeout,
        set: |c, v| c.idle_timeout = Some(v),
        check: |v| at_most(v, YEAR_SECS),
    },
    NumKey {
        key: "mobile-idle-timeout",
        get: |c| c.mobile_idle_timeout,
        set: |c, v| c.mobile_idle_timeout = Some(v),
        check: |v| at_most(v, YEAR_SECS),
    },
    NumKey {
        key: "stats-report-time",
        get: |c| c.stats_report_time,
        set: |c, v| c.stats_report_time = Some(v),
        check: |v| at_most(v, DAY_SECS),
    },
    NumKey {
        key: "mtu",
        get: |c| c.mtu,
        set: |c, v| c.mtu = Some(v),
        check: mtu,
    },
    NumKey {
        key: "dpd",
        get: |c| c.dpd,
        set: |c, v| c.dpd = Some(v),
        check: |v| at_most(v, DAY_SECS),
    },
    NumKey {
        key: "mobile-dpd",
        get: |c| c.mobile_dpd,
        set: |c, v| c.mobile_dpd = Some(v),
        check: |v| at_most(v, DAY_SECS),
    },
    NumKey {
        key: "keepalive",
        get: |c| c.keepalive,
        set: |c, v| c.keepalive = Some(v),
        check: |v| at_most(v, DAY_SECS),
    },
    NumKey {
        key: "max-same-clients",
        get: |c| c.max_same_clients,
        set: |c, v| c.max_same_clients = Some(v),
        check: |v| at_most(v, u32::from(u16::MAX)),
    },
];

/// ocserv's own bound on IPv6 prefixes (`valid_ipv6_prefix`: 11..=128).
const IPV6_PREFIXES: std::ops::RangeInclusive<u8> = 11..=128;

impl PerUserConfig {
    /// Whether the model sets nothing (renders the header only).
    pub fn is_empty(&self) -> bool {
        *self == PerUserConfig::default()
    }

    /// Checks every bound ocserv does not check (or checks by rejecting the session): list
    /// lengths and duplicates, host bits, address families, numeric ranges, and that explicit
    /// addresses lie in their pools. The first problem found is returned, naming its key.
    pub fn validate(&self) -> Result<(), PerUserError> {
        check_list("route", &self.routes, MAX_ROUTES, check_net)?;
        check_list("no-route", &self.no_routes, MAX_ROUTES, check_net)?;
        check_list("iroute", &self.iroutes, MAX_ROUTES, check_iroute)?;
        check_list("dns", &self.dns, MAX_SERVERS, check_server)?;
        check_list("nbns", &self.nbns, MAX_SERVERS, check_server)?;
        check_list("split-dns", &self.split_dns, MAX_SPLIT_DNS, |_| Ok(()))?;

        if let Some(net) = self.ipv4_network {
            check_net(&IpNet::V4(net)).map_err(|r| PerUserError::invalid("ipv4-network", r))?;
            if net.prefix_len() == 0 || net.prefix_len() > 30 {
                return Err(PerUserError::invalid(
                    "ipv4-network",
                    format!(
                        "{net}: the prefix must be 1..=30 (a smaller network leaves no address \
                         for clients)"
                    ),
                ));
            }
        }
        if let Some(net) = self.ipv6_network {
            check_net(&IpNet::V6(net)).map_err(|r| PerUserError::invalid("ipv6-network", r))?;
            if !IPV6_PREFIXES.contains(&net.prefix_len()) {
                return Err(PerUserError::invalid(
                    "ipv6-network",
                    format!("{net}: ocserv accepts prefixes 11..=128 only"),
                ));
            }
        }
        if let Some(p) = self.ipv6_subnet_prefix {
            if !IPV6_PREFIXES.contains(&p) {
                return Err(PerUserError::invalid(
                    "ipv6-subnet-prefix",
                    format!("{p} is outside 11..=128"),
                ));
            }
            if let Some(net) = self.ipv6_network.filter(|n| p < n.prefix_len()) {
                return Err(PerUserError::invalid(
                    "ipv6-subnet-prefix",
                    format!("/{p} is shorter than the prefix of ipv6-network {net}"),
                ));
            }
        }
        if let Some(a) = self.explicit_ipv4 {
            check_host(IpAddr::V4(a)).map_err(|r| PerUserError::invalid("explicit-ipv4", r))?;
            if let Some(net) = self.ipv4_network.filter(|n| !n.contains(&a)) {
                return Err(PerUserError::invalid(
                    "explicit-ipv4",
                    format!("{a} is outside ipv4-network {net}"),
                ));
            }
        }
        if let Some(a) = self.explicit_ipv6 {
            check_host(IpAddr::V6(a)).map_err(|r| PerUserError::invalid("explicit-ipv6", r))?;
            if let Some(net) = self.ipv6_network.filter(|n| !n.contains(&a)) {
                return Err(PerUserError::invalid(
                    "explicit-ipv6",
                    format!("{a} is outside ipv6-network {net}"),
                ));
            }
        }
        for k in NUM_KEYS {
            if let Some(v) = (k.get)(self) {
                (k.check)(v).map_err(|r| PerUserError::invalid(k.key, r))?;
            }
        }
        Ok(())
    }
}

/// Checks a list's length, each entry, and that no entry repeats.
fn check_list<T: Eq + Hash + fmt::Display>(
    key: &'static str,
    items: &[T],
    max: usize,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<(), PerUserError> {
    if items.len() > max {
        return Err(PerUserError::invalid(
            key,
            format!("{} entries, the limit is {max}", items.len()),
        ));
    }
    let mut seen = HashSet::with_capacity(items.len());
    for item in items {
        check(item).map_err(|r| PerUserError::invalid(key, r))?;
        if !seen.insert(item) {
            return Err(PerUserError::invalid(
                key,
                format!("{item} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// A network must be written without host bits.
fn check_net(net: &IpNet) -> Result<(), String> {
    if net.trunc() != *net {
        return Err(format!(
            "{net} has host bits set (the network is {})",
            net.trunc()
        ));
    }
    Ok(())
}

/// An `iroute` becomes a route on the server itself: it must not take over the server's default
/// route, its loopback or a multicast range.
fn check_iroute(net: &IpNet) -> Result<(), String> {
    check_net(net)?;
    let addr = net.network();
    if net.prefix_len() == 0 {
        return Err(format!(
            "{net} would send all of the server's traffic to this client"
        ));
    }
    if addr.is_loopback() || addr.is_multicast() || addr.is_unspecified() {
        return Err(format!(
            "{net} is a loopback, multicast or unspecified network"
        ));
    }
    Ok(())
}

/// A server address (DNS, NBNS) must be a usable unicast address.
fn check_server(addr: &IpAddr) -> Result<(), String> {
    check_host(*addr)
}

fn check_host(addr: IpAddr) -> Result<(), String> {
    let broadcast = matches!(addr, IpAddr::V4(a) if a.is_broadcast());
    if addr.is_unspecified() || addr.is_multicast() || broadcast {
        return Err(format!("{addr} is not a unicast address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
