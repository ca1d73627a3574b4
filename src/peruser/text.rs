//! ocserv's per-user file syntax: [`render`] a model, [`parse`] a file back into one.
//!
//! ocserv 1.x reads these files with inih: `key = value` lines, `#` or `;` comment lines, keys
//! compared case-sensitively, an indented line continuing the previous value. [`render`] writes
//! a fixed header comment and then one `key = value` line per value, in a fixed key order, so
//! equal models give byte-identical files (the writer relies on that to skip unchanged files).
//!
//! [`parse`] reads what [`render`] writes and hand-written files using the same keys (extra
//! blank lines and comments, address/netmask routes, the `ipv4-`/`ipv6-` DNS aliases, `yes`/`no`
//! booleans, `ipv4-network` with a prefix). It is stricter than ocserv where ocserv would guess:
//! unknown keys, sections, indented lines, repeated scalar keys, numbers with garbage (ocserv's
//! `strtol` makes them 0) and booleans other than true/yes/false/no are errors naming the line.
//! The parsed model is validated ([`PerUserConfig::validate`]) before it is returned.

use std::collections::HashMap;
use std::fmt::{Display, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{DomainName, PerUserConfig, PerUserError, BOOL_KEYS, NUM_KEYS};

/// The first line of every rendered file.
pub const HEADER: &str =
    "# Written by ocserv-agent; edits here are replaced by its next write for this name.\n";

/// Largest file [`parse`] reads, in bytes (a maximal model renders to well under this).
pub const MAX_FILE_BYTES: usize = 1 << 20;

fn line(out: &mut String, key: &str, value: impl Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key} = {value}");
}

/// Renders `config` in ocserv syntax: [`HEADER`], then one `key = value` line per value in a
/// fixed order. Every value is a typed value whose text has no whitespace, `=`, `#`, `;` or
/// control character, so the output has exactly these lines whatever the model holds. Bounds
/// are not checked here: call [`PerUserConfig::validate`] first (the writer does).
pub fn render(config: &PerUserConfig) -> String {
    let mut out = String::from(HEADER);
    let c = config;
    for net in &c.routes {
        line(&mut out, "route", net);
    }
    for net in &c.no_routes {
        line(&mut out, "no-route", net);
    }
    for net in &c.iroutes {
        line(&mut out, "iroute", net);
    }
    for addr in &c.dns {
        line(&mut out, "dns", addr);
    }
    for addr in &c.nbns {
        line(&mut out, "nbns", addr);
    }
    for domain in &c.split_dns {
        line(&mut out, "split-dns", domain);
    }
    if let Some(net) = c.ipv4_network {
        // Address and netmask on two lines: the spelling every ocserv version reads.
        line(&mut out, "ipv4-network", net.network());
        line(&mut out, "ipv4-netmask", net.netmask());
    }
    if let Some(net) = c.ipv6_network {
        line(&mut out, "ipv6-network", net);
    }
    if let Some(prefix) = c.ipv6_subnet_prefix {
        line(&mut out, "ipv6-subnet-prefix", prefix);
    }
    if let Some(addr) = c.explicit_ipv4 {
        line(&mut out, "explicit-ipv4", addr);
    }
    if let Some(addr) = c.explicit_ipv6 {
        line(&mut out, "explicit-ipv6", addr);
    }
    if let Some(name) = &c.hostname {
        line(&mut out, "hostname", name);
    }
    for k in BOOL_KEYS {
        if let Some(v) = (k.get)(c) {
            line(&mut out, k.key, v);
        }
    }
    for k in NUM_KEYS {
        if let Some(v) = (k.get)(c) {
            line(&mut out, k.key, v);
        }
    }
    out
}

/// Keys of ocserv's per-user files that the model deliberately does not hold (see the module
/// documentation of [`super`]); named in the error so the reason is clear.
const UNMODELLED: &[&str] = &[
    "restrict-user-to-ports",
    "user-profile",
    "cgroup",
    "net-priority",
    "ipv6-prefix",
];

/// Parses a per-user or per-group file into a validated model.
///
/// Errors name the line and, for a bad value, the key. See the module documentation for what is
/// accepted beyond [`render`]'s output.
pub fn parse(text: &str) -> Result<PerUserConfig, PerUserError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(PerUserError::Syntax {
            line: 1,
            reason: format!(
                "the file is {} bytes, the limit is {MAX_FILE_BYTES}",
                text.len()
            ),
        });
    }
    let mut p = Parser::default();
    for (i, raw) in text.lines().enumerate() {
        p.line(i + 1, raw)?;
    }
    p.finish()
}

/// IPv4 pool as read: `ipv4-network` (with or without a prefix) and `ipv4-netmask` come on
/// separate lines and are combined at the end.
#[derive(Default)]
struct Parser {
    config: PerUserConfig,
    /// The line each key was last seen on, to attach to validation errors.
    lines: HashMap<&'static str, usize>,
    ipv4_addr: Option<(Ipv4Addr, Option<u8>)>,
    ipv4_netmask: Option<Ipv4Addr>,
}

impl Parser {
    fn line(&mut self, n: usize, raw: &str) -> Result<(), PerUserError> {
        let syntax = |reason: String| PerUserError::Syntax { line: n, reason };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            return Ok(());
        }
        if raw.starts_with(char::is_whitespace) {
            return Err(syntax(
                "an indented line is read by ocserv as a continuation of the previous value".into(),
            ));
        }
        if trimmed.starts_with('[') {
            return Err(syntax("sections are not part of a per-user file".into()));
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(syntax("expected `key = value`".into()));
        };
        let (key, value) = (key.trim(), value.trim());
        let Some(key) = known_key(key) else {
            let reason = if UNMODELLED.contains(&key) {
                format!("{key:?} is an ocserv key that ocserv-agent does not manage")
            } else if key == "tunnel-all-dns" {
                "ocserv 1.1.6 ignores \"tunnel-all-dns\": the key is \"tunnel_all_dns\"".into()
            } else {
                format!("unknown key {key:?}")
            };
            return Err(syntax(reason));
        };
        let invalid = |reason: String| PerUserError::Invalid {
            key,
            line: Some(n),
            reason,
        };
        if value.is_empty() {
            return Err(invalid("has no value".into()));
        }
        let c = &mut self.config;
        // Scalar keys appear once: ocserv keeps the last, which hides a mistake.
        let is_list = matches!(
            key,
            "route"
                | "no-route"
                | "iroute"
                | "dns"
                | "ipv4-dns"
                | "ipv6-dns"
                | "nbns"
                | "ipv4-nbns"
                | "ipv6-nbns"
                | "split-dns"
        );
        let canonical = canonical_key(key);
        if let Some(first) = self.lines.insert(canonical, n).filter(|_| !is_list) {
            return Err(invalid(format!("is set twice (first on line {first})")));
        }
        match key {
            "route" => c.routes.push(parse_net(value).map_err(invalid)?),
            "no-route" => c.no_routes.push(parse_net(value).map_err(invalid)?),
            "iroute" => c.iroutes.push(parse_net(value).map_err(invalid)?),
            "dns" | "ipv4-dns" | "ipv6-dns" => {
                c.dns.push(parse_server(key, value).map_err(invalid)?)
            }
            "nbns" | "ipv4-nbns" | "ipv6-nbns" => {
                c.nbns.push(parse_server(key, value).map_err(invalid)?)
            }
            "split-dns" => c
                .split_dns
                .push(DomainName::new(value).map_err(|e| invalid(e.to_string()))?),
            "hostname" => {
                c.hostname = Some(DomainName::new(value).map_err(|e| invalid(e.to_string()))?)
            }
            "ipv4-network" => {
                self.ipv4_addr = Some(parse_ipv4_network(value).map_err(invalid)?);
            }
            "ipv4-netmask" => {
                self.ipv4_netmask =
                    Some(typed::<Ipv4Addr>(value, "an IPv4 netmask").map_err(invalid)?);
            }
            "ipv6-network" => {
                c.ipv6_network = Some(
                    typed::<Ipv6Net>(value, "an IPv6 network like fd00::/48").map_err(invalid)?,
                )
            }
            "ipv6-subnet-prefix" => {
                c.ipv6_subnet_prefix = Some(
                    parse_number(value)
                        .and_then(|v| u8::try_from(v).map_err(|_| format!("{v} is above 128")))
                        .map_err(invalid)?,
                )
            }
            "explicit-ipv4" => {
                c.explicit_ipv4 = Some(typed(value, "an IPv4 address").map_err(invalid)?)
            }
            "explicit-ipv6" => {
                c.explicit_ipv6 = Some(typed(value, "an IPv6 address").map_err(invalid)?)
            }
            _ => {
                if let Some(k) = BOOL_KEYS.iter().find(|k| k.key == key) {
                    (k.set)(c, parse_bool(value).map_err(invalid)?);
                } else if let Some(k) = NUM_KEYS.iter().find(|k| k.key == key) {
                    (k.set)(c, parse_number(value).map_err(invalid)?);
                } else {
                    // known_key and this match list the same keys; should they ever drift
                    // apart, the key is refused rather than silently dropped.
                    return Err(syntax(format!("unknown key {key:?}")));
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<PerUserConfig, PerUserError> {
        let line = |lines: &HashMap<&'static str, usize>, key| lines.get(key).copied();
        self.config.ipv4_network = match (self.ipv4_addr, self.ipv4_netmask) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(PerUserError::Invalid {
                    key: "ipv4-netmask",
                    line: line(&self.lines, "ipv4-netmask"),
                    reason: "is given without ipv4-network".into(),
                })
            }
            (Some((addr, prefix)), mask) => {
                let invalid = |reason: String| PerUserError::Invalid {
                    key: "ipv4-network",
                    line: line(&self.lines, "ipv4-network"),
                    reason,
                };
                let from_mask = mask
                    .map(|m| {
                        Ipv4Net::with_netmask(addr, m)
                            .map(|n| n.prefix_len())
                            .map_err(|_| invalid(format!("ipv4-netmask {m} is not a netmask")))
                    })
                    .transpose()?;
                let prefix = match (prefix, from_mask) {
                    (Some(p), Some(m)) if p != m => {
                        return Err(invalid(format!(
                            "its prefix /{p} contradicts ipv4-netmask (/{m})"
                        )))
                    }
                    (Some(p), _) | (None, Some(p)) => p,
                    (None, None) => {
                        return Err(invalid(format!(
                            "{addr} needs a /prefix or an ipv4-netmask line"
                        )))
                    }
                };
                Some(Ipv4Net::new(addr, prefix).map_err(|_| invalid("bad prefix".into()))?)
            }
        };
        match self.config.validate() {
            Ok(()) => Ok(self.config),
            Err(PerUserError::Invalid {
                key,
                line: None,
                reason,
            }) => Err(PerUserError::Invalid {
                key,
                line: self.lines.get(key).copied(),
                reason,
            }),
            Err(e) => Err(e),
        }
    }
}

/// The static spelling of a key this parser reads, or `None`.
fn known_key(key: &str) -> Option<&'static str> {
    const OTHERS: &[&str] = &[
        "route",
        "no-route",
        "iroute",
        "dns",
        "ipv4-dns",
        "ipv6-dns",
        "nbns",
        "ipv4-nbns",
        "ipv6-nbns",
        "split-dns",
        "hostname",
        "ipv4-network",
        "ipv4-netmask",
        "ipv6-network",
        "ipv6-subnet-prefix",
        "explicit-ipv4",
        "explicit-ipv6",
    ];
    OTHERS
        .iter()
        .copied()
        .chain(BOOL_KEYS.iter().map(|k| k.key))
        .chain(NUM_KEYS.iter().map(|k| k.key))
        .find(|k| *k == key)
}

/// The key a line is recorded under: aliases count as the key they feed.
fn canonical_key(key: &'static str) -> &'static str {
    match key {
        "ipv4-dns" | "ipv6-dns" => "dns",
        "ipv4-nbns" | "ipv6-nbns" => "nbns",
        other => other,
    }
}

fn typed<T: FromStr>(value: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{value:?} is not {what}"))
}

/// A network in CIDR form (`10.0.0.0/8`, `fd00::/48`) or IPv4 address/netmask form
/// (`10.0.0.0/255.0.0.0`), both of which ocserv accepts.
fn parse_net(value: &str) -> Result<IpNet, String> {
    if let Some((addr, mask)) = value.split_once('/').filter(|(_, m)| m.contains('.')) {
        let addr: Ipv4Addr = typed(addr, "an IPv4 address")?;
        let mask: Ipv4Addr = typed(mask, "an IPv4 netmask")?;
        return Ipv4Net::with_netmask(addr, mask)
            .map(IpNet::V4)
            .map_err(|_| format!("{mask} is not a netmask"));
    }
    typed(
        value,
        "a network like 10.0.0.0/8, 10.0.0.0/255.0.0.0 or fd00::/48",
    )
}

fn parse_ipv4_network(value: &str) -> Result<(Ipv4Addr, Option<u8>), String> {
    match value.split_once('/') {
        None => Ok((typed(value, "an IPv4 address")?, None)),
        Some(_) => {
            let net: Ipv4Net = typed(value, "an IPv4 network like 10.1.0.0/16")?;
            Ok((net.addr(), Some(net.prefix_len())))
        }
    }
}

/// A server address; the `ipv4-`/`ipv6-` aliases must hold an address of their family.
fn parse_server(key: &str, value: &str) -> Result<IpAddr, String> {
    match key {
        "ipv4-dns" | "ipv4-nbns" => typed::<Ipv4Addr>(value, "an IPv4 address").map(IpAddr::V4),
        "ipv6-dns" | "ipv6-nbns" => typed::<Ipv6Addr>(value, "an IPv6 address").map(IpAddr::V6),
        _ => typed(value, "an IP address"),
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("yes") {
        Ok(true)
    } else if value.eq_ignore_ascii_case("false") || value.eq_ignore_ascii_case("no") {
        Ok(false)
    } else {
        Err(format!("{value:?} is not true, yes, false or no"))
    }
}

/// A decimal number of digits only: ocserv's `strtol` would read garbage as 0.
fn parse_number(value: &str) -> Result<u32, String> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{value:?} is not a decimal number"));
    }
    value
        .parse()
        .map_err(|_| format!("{value} is above {}", u32::MAX))
}
