//! Tests of the model, its validation, [`render`] and [`parse`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn domain(s: &str) -> DomainName {
    DomainName::new(s).unwrap()
}

/// A model with every key set.
fn full() -> PerUserConfig {
    PerUserConfig {
        routes: vec![net("10.0.0.0/8"), net("2001:db8::/32")],
        no_routes: vec![net("192.168.0.0/16")],
        iroutes: vec![net("172.16.5.0/24")],
        dns: vec![
            "10.0.0.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ],
        nbns: vec!["10.0.0.137".parse().unwrap()],
        split_dns: vec![domain("corp.example.com"), domain("Example.ORG")],
        tunnel_all_dns: Some(true),
        ipv4_network: Some("10.20.0.0/16".parse().unwrap()),
        ipv6_network: Some("fd00:1::/48".parse().unwrap()),
        ipv6_subnet_prefix: Some(64),
        explicit_ipv4: Some("10.20.0.7".parse().unwrap()),
        explicit_ipv6: Some("fd00:1::7".parse().unwrap()),
        hostname: Some(domain("alice-laptop")),
        restrict_user_to_routes: Some(false),
        deny_roaming: Some(true),
        no_udp: Some(false),
        rx_data_per_sec: Some(0),
        tx_data_per_sec: Some(125_000),
        session_timeout: Some(86_400),
        idle_timeout: Some(1200),
        mobile_idle_timeout: Some(2400),
        stats_report_time: Some(300),
        mtu: Some(1400),
        dpd: Some(90),
        mobile_dpd: Some(1800),
        keepalive: Some(32400),
        max_same_clients: Some(2),
    }
}

const FULL_TEXT: &str = "\
route = 10.0.0.0/8
route = 2001:db8::/32
no-route = 192.168.0.0/16
iroute = 172.16.5.0/24
dns = 10.0.0.53
dns = 2001:db8::53
nbns = 10.0.0.137
split-dns = corp.example.com
split-dns = Example.ORG
ipv4-network = 10.20.0.0
ipv4-netmask = 255.255.0.0
ipv6-network = fd00:1::/48
ipv6-subnet-prefix = 64
explicit-ipv4 = 10.20.0.7
explicit-ipv6 = fd00:1::7
hostname = alice-laptop
tunnel_all_dns = true
restrict-user-to-routes = false
deny-roaming = true
no-udp = false
rx-data-per-sec = 0
tx-data-per-sec = 125000
session-timeout = 86400
idle-timeout = 1200
mobile-idle-timeout = 2400
stats-report-time = 300
mtu = 1400
dpd = 90
mobile-dpd = 1800
keepalive = 32400
max-same-clients = 2
";

#[test]
fn renders_every_key_in_ocserv_1_1_6_spelling_and_fixed_order() {
    let model = full();
    assert_eq!(model.validate(), Ok(()));
    assert_eq!(render(&model), format!("{HEADER}{FULL_TEXT}"));
    assert_eq!(parse(&render(&model)), Ok(model));
}

#[test]
fn empty_model_renders_the_header_only_and_parses_back() {
    let empty = PerUserConfig::default();
    assert!(empty.is_empty());
    assert_eq!(render(&empty), HEADER);
    assert!(HEADER.starts_with('#') && HEADER.ends_with('\n'));
    assert_eq!(HEADER.lines().count(), 1);
    assert_eq!(parse(HEADER), Ok(empty.clone()));
    assert_eq!(parse(""), Ok(empty));
    assert!(!full().is_empty());
}

/// Asserts that `model` is refused for `key` with a reason containing `why`.
fn refused(model: PerUserConfig, key: &str, why: &str) {
    match model.validate() {
        Err(PerUserError::Invalid {
            key: k,
            line: None,
            reason,
        }) => {
            assert_eq!(k, key, "{reason}");
            assert!(reason.contains(why), "{key}: {reason:?} lacks {why:?}");
        }
        other => panic!("{key}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn validation_names_the_key_and_the_reason() {
    let m = PerUserConfig::default;
    refused(
        PerUserConfig {
            routes: vec![net("10.0.0.1/8")],
            ..m()
        },
        "route",
        "host bits",
    );
    refused(
        PerUserConfig {
            no_routes: vec![net("10.0.0.0/8"), net("10.0.0.0/8")],
            ..m()
        },
        "no-route",
        "twice",
    );
    refused(
        PerUserConfig {
            routes: (0..=MAX_ROUTES as u32)
                .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(i << 8), 24).unwrap()))
                .collect(),
            ..m()
        },
        "route",
        "1025 entries, the limit is 1024",
    );
    for bad in ["0.0.0.0/0", "::/0"] {
        refused(
            PerUserConfig {
                iroutes: vec![net(bad)],
                ..m()
            },
            "iroute",
            "all of the server's traffic",
        );
    }
    for bad in ["127.0.0.0/8", "224.0.0.0/4", "::1/128", "ff00::/8"] {
        refused(
            PerUserConfig {
                iroutes: vec![net(bad)],
                ..m()
            },
            "iroute",
            "loopback, multicast",
        );
    }
    // A default route is a normal `route` (full tunnel for this network).
    let default_route = PerUserConfig {
        routes: vec![net("0.0.0.0/0")],
        ..m()
    };
    assert_eq!(default_route.validate(), Ok(()));
    for bad in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255"] {
        refused(
            PerUserConfig {
                dns: vec![bad.parse().unwrap()],
                ..m()
            },
            "dns",
            "not a unicast address",
        );
    }
    refused(
        PerUserConfig {
            nbns: vec![IpAddr::V4(Ipv4Addr::LOCALHOST); MAX_SERVERS + 1],
            ..m()
        },
        "nbns",
        "17 entries",
    );
    refused(
        PerUserConfig {
            split_dns: vec![domain("a.example"), domain("a.example")],
            ..m()
        },
        "split-dns",
        "twice",
    );
    for (v, why) in [(1, "unlimited"), (999, "unlimited")] {
        refused(
            PerUserConfig {
                rx_data_per_sec: Some(v),
                ..m()
            },
            "rx-data-per-sec",
            why,
        );
    }
    refused(
        PerUserConfig {
            mtu: Some(575),
            ..m()
        },
        "mtu",
        "576..=9000",
    );
    refused(
        PerUserConfig {
            session_timeout: Some(366 * 24 * 3600),
            ..m()
        },
        "session-timeout",
        "above the limit",
    );
    refused(
        PerUserConfig {
            dpd: Some(86_401),
            ..m()
        },
        "dpd",
        "above the limit 86400",
    );
    refused(
        PerUserConfig {
            max_same_clients: Some(65_536),
            ..m()
        },
        "max-same-clients",
        "65535",
    );
    refused(
        PerUserConfig {
            ipv4_network: Some("10.0.0.0/31".parse().unwrap()),
            ..m()
        },
        "ipv4-network",
        "1..=30",
    );
    refused(
        PerUserConfig {
            ipv4_network: Some("10.0.0.1/24".parse().unwrap()),
            ..m()
        },
        "ipv4-network",
        "host bits",
    );
    refused(
        PerUserConfig {
            ipv6_network: Some("fd00::/10".parse().unwrap()),
            ..m()
        },
        "ipv6-network",
        "11..=128",
    );
    refused(
        PerUserConfig {
            ipv6_subnet_prefix: Some(10),
            ..m()
        },
        "ipv6-subnet-prefix",
        "11..=128",
    );
    refused(
        PerUserConfig {
            ipv6_network: Some("fd00::/64".parse().unwrap()),
            ipv6_subnet_prefix: Some(48),
            ..m()
        },
        "ipv6-subnet-prefix",
        "shorter than",
    );
    refused(
        PerUserConfig {
            ipv4_network: Some("10.20.0.0/16".parse().unwrap()),
            explicit_ipv4: Some("10.21.0.1".parse().unwrap()),
            ..m()
        },
        "explicit-ipv4",
        "outside ipv4-network",
    );
    refused(
        PerUserConfig {
            ipv6_network: Some("fd00:1::/48".parse().unwrap()),
            explicit_ipv6: Some("fd00:2::1".parse().unwrap()),
            ..m()
        },
        "explicit-ipv6",
        "outside ipv6-network",
    );
    // The limits themselves are accepted.
    let edges = PerUserConfig {
        rx_data_per_sec: Some(1000),
        tx_data_per_sec: Some(u32::MAX),
        mtu: Some(9000),
        session_timeout: Some(365 * 24 * 3600),
        dpd: Some(86_400),
        max_same_clients: Some(65_535),
        ipv4_network: Some("10.0.0.0/30".parse().unwrap()),
        ipv6_subnet_prefix: Some(128),
        ..m()
    };
    assert_eq!(edges.validate(), Ok(()));
}

#[test]
fn domain_names_follow_the_label_rules() {
    let label63 = "a".repeat(63);
    let long = [label63.as_str(); 4].join(".")[..253].to_string();
    for ok in [
        "a",
        "corp",
        "corp.example.com",
        "xn--bcher-kva.example",
        "a-b.c-d",
        "1.2.3.example",
        "UPPER.Case",
        label63.as_str(),
        long.trim_end_matches('.'),
    ] {
        assert_eq!(
            DomainName::new(ok).map(|d| d.to_string()),
            Ok(ok.to_string())
        );
    }
    let label64 = "a".repeat(64);
    let too_long = format!("{}.{}", "a".repeat(200), "b".repeat(53));
    for (bad, why) in [
        ("", "empty"),
        (".", "empty label"),
        ("a..b", "empty label"),
        ("example.com.", "empty label"),
        (".example.com", "empty label"),
        ("-a.example", "start or end"),
        ("a-.example", "start or end"),
        ("a_b.example", "'_'"),
        ("a b", "' '"),
        ("a=b", "'='"),
        ("a#b", "'#'"),
        ("a;b", "';'"),
        ("a\nb", "'\\n'"),
        ("a\0b", "'\\0'"),
        ("bücher.example", "'ü'"),
        (label64.as_str(), "64 bytes"),
        (too_long.as_str(), "254 bytes"),
    ] {
        let e = DomainName::new(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e:?} lacks {why:?}");
    }
}

#[test]
fn parses_reasonable_hand_written_files() {
    let text = "\
# hand-written
; another comment

route = 10.0.0.0/255.0.0.0
route=2001:db8::/32\r
ipv4-dns = 10.0.0.53
ipv6-dns = 2001:db8::53
dns = 10.0.0.54
ipv4-nbns = 10.0.0.137
split-dns =   corp.example.com   
tunnel_all_dns = YES
no-udp = no
deny-roaming = True
ipv4-network = 10.20.0.0/16
";
    let expected = PerUserConfig {
        routes: vec![net("10.0.0.0/8"), net("2001:db8::/32")],
        dns: vec![
            "10.0.0.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
            "10.0.0.54".parse().unwrap(),
        ],
        nbns: vec!["10.0.0.137".parse().unwrap()],
        split_dns: vec![domain("corp.example.com")],
        tunnel_all_dns: Some(true),
        no_udp: Some(false),
        deny_roaming: Some(true),
        ipv4_network: Some("10.20.0.0/16".parse().unwrap()),
        ..PerUserConfig::default()
    };
    assert_eq!(parse(text), Ok(expected));
    // A prefix and a netmask that agree are fine.
    let both = "ipv4-network = 10.20.0.0/16\nipv4-netmask = 255.255.0.0\n";
    assert_eq!(
        parse(both).unwrap().ipv4_network,
        Some("10.20.0.0/16".parse().unwrap())
    );
}

/// Asserts that parsing `text` fails on `line` with a message containing `why`.
fn parse_fails(text: &str, line: usize, why: &str) {
    let e = parse(text).expect_err(text);
    let got = match &e {
        PerUserError::Invalid { line: l, .. } => *l,
        PerUserError::Syntax { line: l, .. } => Some(*l),
    };
    assert_eq!(got, Some(line), "{text:?}: {e}");
    assert!(e.to_string().contains(why), "{text:?}: {e} lacks {why:?}");
}

#[test]
fn parse_errors_name_the_line_and_the_key() {
    parse_fails("route = 10.0.0.0/8\nfoo = 1\n", 2, "unknown key \"foo\"");
    parse_fails(
        "restrict-user-to-ports = \"tcp(443)\"\n",
        1,
        "does not manage",
    );
    parse_fails("tunnel-all-dns = true\n", 1, "tunnel_all_dns");
    parse_fails("Route = 10.0.0.0/8\n", 1, "unknown key \"Route\"");
    parse_fails("route = 10.0.0.0/8\n  route = 10.1.0.0/16\n", 2, "indented");
    parse_fails("[vhost:x]\n", 1, "sections");
    parse_fails("route 10.0.0.0/8\n", 1, "expected `key = value`");
    parse_fails("\n\nroute =\n", 3, "invalid route (line 3): has no value");
    parse_fails("route = 10.0.0.0\n", 1, "invalid route (line 1)");
    parse_fails("route = 10.0.0.0/8 # office\n", 1, "invalid route");
    parse_fails("route = 10.0.0.0/255.0.255.0\n", 1, "not a netmask");
    parse_fails("route = 10.0.0.1/8\n", 1, "host bits");
    parse_fails("mtu = 1400\nmtu = 1300\n", 2, "set twice (first on line 1)");
    parse_fails("mtu = 14OO\n", 1, "not a decimal number");
    parse_fails("mtu = -1\n", 1, "not a decimal number");
    parse_fails("mtu = 99999999999\n", 1, "above 4294967295");
    parse_fails(
        "# c\nmtu = 100\n",
        2,
        "invalid mtu (line 2): 100 is outside",
    );
    parse_fails("no-udp = maybe\n", 1, "not true, yes, false or no");
    parse_fails("ipv4-dns = 2001:db8::1\n", 1, "IPv4 address");
    parse_fails("ipv6-nbns = 10.0.0.1\n", 1, "IPv6 address");
    parse_fails("ipv4-netmask = 255.0.0.0\n", 1, "without ipv4-network");
    parse_fails("ipv4-network = 10.0.0.0\n", 1, "needs a /prefix");
    parse_fails(
        "ipv4-network = 10.0.0.0/8\nipv4-netmask = 255.255.0.0\n",
        1,
        "contradicts",
    );
    parse_fails("ipv6-network = fd00::\n", 1, "IPv6 network");
    parse_fails("ipv6-subnet-prefix = 300\n", 1, "above 128");
    parse_fails("split-dns = a_b.example\n", 1, "invalid split-dns");
    parse_fails(
        "dns = 10.0.0.1\nroute = 10.0.0.0/8\ndns = 10.0.0.1\n",
        3,
        "invalid dns (line 3): 10.0.0.1 is listed twice",
    );
    let huge = "#".repeat(MAX_FILE_BYTES + 1);
    parse_fails(&huge, 1, "the limit is 1048576");
}

/// How many lines each key should have in the rendered `model`, computed from the fields
/// directly (independently of the key tables).
fn expected_lines(c: &PerUserConfig) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    let mut add = |k: &'static str, n: usize| {
        if n > 0 {
            m.insert(k, n);
        }
    };
    add("route", c.routes.len());
    add("no-route", c.no_routes.len());
    add("iroute", c.iroutes.len());
    add("dns", c.dns.len());
    add("nbns", c.nbns.len());
    add("split-dns", c.split_dns.len());
    add("tunnel_all_dns", c.tunnel_all_dns.is_some() as usize);
    add("ipv4-network", c.ipv4_network.is_some() as usize);
    add("ipv4-netmask", c.ipv4_network.is_some() as usize);
    add("ipv6-network", c.ipv6_network.is_some() as usize);
    add(
        "ipv6-subnet-prefix",
        c.ipv6_subnet_prefix.is_some() as usize,
    );
    add("explicit-ipv4", c.explicit_ipv4.is_some() as usize);
    add("explicit-ipv6", c.explicit_ipv6.is_some() as usize);
    add("hostname", c.hostname.is_some() as usize);
    add(
        "restrict-user-to-routes",
        c.restrict_user_to_routes.is_some() as usize,
    );
    add("deny-roaming", c.deny_roaming.is_some() as usize);
    add("no-udp", c.no_udp.is_some() as usize);
    add("rx-data-per-sec", c.rx_data_per_sec.is_some() as usize);
    add("tx-data-per-sec", c.tx_data_per_sec.is_some() as usize);
    add("session-timeout", c.session_timeout.is_some() as usize);
    add("idle-timeout", c.idle_timeout.is_some() as usize);
    add(
        "mobile-idle-timeout",
        c.mobile_idle_timeout.is_some() as usize,
    );
    add("stats-report-time", c.stats_report_time.is_some() as usize);
    add("mtu", c.mtu.is_some() as usize);
    add("dpd", c.dpd.is_some() as usize);
    add("mobile-dpd", c.mobile_dpd.is_some() as usize);
    add("keepalive", c.keepalive.is_some() as usize);
    add("max-same-clients", c.max_same_clients.is_some() as usize);
    m
}

#[test]
fn the_full_model_sets_every_key_once_or_more() {
    let counts = expected_lines(&full());
    // 28 keys: every field (the IPv4 pool is two keys).
    assert_eq!(counts.len(), 28);
    for k in BOOL_KEYS
        .iter()
        .map(|k| k.key)
        .chain(NUM_KEYS.iter().map(|k| k.key))
    {
        assert_eq!(counts.get(k), Some(&1), "{k}");
    }
}

// ---- strategies ----

/// Keeps the first of each repeated value (validation refuses repeats).
fn dedup<T: Eq + std::hash::Hash + Clone>(v: Vec<T>) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    v.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

fn any_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0..=32u8)
            .prop_map(|(a, p)| IpNet::V4(Ipv4Net::new(a.into(), p).unwrap().trunc())),
        (any::<u128>(), 0..=128u8)
            .prop_map(|(a, p)| IpNet::V6(Ipv6Net::new(a.into(), p).unwrap().trunc())),
    ]
}

/// Networks an `iroute` may name: inside 10.0.0.0/8 or fd00::/8.
fn iroute_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 8..=32u8).prop_map(|(a, p)| {
            let a = Ipv4Addr::from(0x0a00_0000 | (a & 0x00ff_ffff));
            IpNet::V4(Ipv4Net::new(a, p).unwrap().trunc())
        }),
        (any::<u128>(), 8..=128u8).prop_map(|(a, p)| {
            let a = Ipv6Addr::from((0xfd << 120) | (a & (u128::MAX >> 8)));
            IpNet::V6(Ipv6Net::new(a, p).unwrap().trunc())
        }),
    ]
}

/// Unicast server addresses: 1.0.0.0..224.0.0.0 or 2000::/3.
fn server() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0x0100_0000u32..0xe000_0000).prop_map(|a| IpAddr::V4(a.into())),
        any::<u128>().prop_map(|a| IpAddr::V6((0x2000 << 112 | (a >> 3)).into())),
    ]
}

fn domain_name() -> impl Strategy<Value = DomainName> {
    "[a-zA-Z0-9]([a-zA-Z0-9-]{0,12}[a-zA-Z0-9])?(\\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,12}[a-zA-Z0-9])?){0,3}"
        .prop_map(|s| DomainName::new(&s).unwrap())
}

/// The IPv4 pool (inside 10.0.0.0/8, prefix 8..=30) and an explicit address inside it.
fn ipv4_pool() -> impl Strategy<Value = (Option<Ipv4Net>, Option<Ipv4Addr>)> {
    (any::<u32>(), 8..=30u8, any::<u32>(), any::<(bool, bool)>()).prop_map(
        |(a, p, host, (has_net, has_addr))| {
            let net = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (a & 0x00ff_ffff)), p)
                .unwrap()
                .trunc();
            let addr = u32::from(net.network()) | (host & u32::from(net.hostmask()));
            (
                has_net.then_some(net),
                has_addr.then_some(Ipv4Addr::from(addr)),
            )
        },
    )
}

/// The IPv6 pool (inside fd00::/8), a subnet prefix at least as long, and an address inside.
type Ipv6Pool = (Option<Ipv6Net>, Option<u8>, Option<Ipv6Addr>);
fn ipv6_pool() -> impl Strategy<Value = Ipv6Pool> {
    (
        11..=128u8,
        any::<u128>(),
        any::<u128>(),
        any::<u8>(),
        any::<[bool; 3]>(),
    )
        .prop_map(|(p, a, host, sub, [has_net, has_sub, has_addr])| {
            let net = Ipv6Net::new(Ipv6Addr::from((0xfd << 120) | (a >> 8)), p)
                .unwrap()
                .trunc();
            let sub = p + sub % (129 - p);
            let addr = u128::from(net.network()) | (host & u128::from(net.hostmask()));
            (
                has_net.then_some(net),
                has_sub.then_some(sub),
                has_addr.then_some(Ipv6Addr::from(addr)),
            )
        })
}

fn rate() -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(prop_oneof![Just(0u32), 1000..=u32::MAX])
}

fn secs(max: u32) -> impl Strategy<Value = Option<u32>> {
    proptest::option::of(0..=max)
}

prop_compose! {
    fn valid_model()(
        (routes, no_routes, iroutes) in (
            proptest::collection::vec(any_net(), 0..6),
            proptest::collection::vec(any_net(), 0..4),
            proptest::collection::vec(iroute_net(), 0..4),
        ),
        (dns, nbns, split_dns, hostname) in (
            proptest::collection::vec(server(), 0..4),
            proptest::collection::vec(server(), 0..3),
            proptest::collection::vec(domain_name(), 0..4),
            proptest::option::of(domain_name()),
        ),
        (v4, v6) in (ipv4_pool(), ipv6_pool()),
        bools in any::<[Option<bool>; 4]>(),
        (rx, tx, session, idle, mobile_idle, stats) in (
            rate(), rate(), secs(365 * 24 * 3600), secs(365 * 24 * 3600),
            secs(365 * 24 * 3600), secs(86_400),
        ),
        (mtu, dpd, mobile_dpd, keepalive, max_same) in (
            proptest::option::of(576..=9000u32), secs(86_400), secs(86_400), secs(86_400),
            secs(65_535),
        ),
    ) -> PerUserConfig {
        PerUserConfig {
            routes: dedup(routes),
            no_routes: dedup(no_routes),
            iroutes: dedup(iroutes),
            dns: dedup(dns),
            nbns: dedup(nbns),
            split_dns: dedup(split_dns),
            hostname,
            ipv4_network: v4.0,
            explicit_ipv4: v4.1,
            ipv6_network: v6.0,
            ipv6_subnet_prefix: v6.1,
            explicit_ipv6: v6.2,
            tunnel_all_dns: bools[0],
            restrict_user_to_routes: bools[1],
            deny_roaming: bools[2],
            no_udp: bools[3],
            rx_data_per_sec: rx,
            tx_data_per_sec: tx,
            session_timeout: session,
            idle_timeout: idle,
            mobile_idle_timeout: mobile_idle,
            stats_report_time: stats,
            mtu,
            dpd,
            mobile_dpd,
            keepalive,
            max_same_clients: max_same,
        }
    }
}

prop_compose! {
    /// Any model the types allow, bounds ignored (out-of-range numbers, host bits, repeats).
    fn any_model()(
        valid in valid_model(),
        iroutes in proptest::collection::vec(
            (any::<u128>(), 0..=128u8).prop_map(|(a, p)| IpNet::V6(Ipv6Net::new(a.into(), p).unwrap())),
            0..4,
        ),
        dns in proptest::collection::vec(any::<IpAddr>(), 0..4),
        numbers in any::<[Option<u32>; 3]>(),
    ) -> PerUserConfig {
        PerUserConfig {
            iroutes,
            dns,
            mtu: numbers[0],
            rx_data_per_sec: numbers[1],
            max_same_clients: numbers[2],
            ..valid
        }
    }
}

/// Characters that would change the meaning of a config line if a value could carry them.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        Just('\n'),
        Just('\r'),
        Just('\0'),
        Just('='),
        Just('#'),
        Just(';'),
        Just(' '),
        Just('\t'),
        Just('['),
        Just('"'),
        (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any valid model survives render → parse unchanged, and rendering is deterministic.
    #[test]
    fn valid_models_round_trip(model in valid_model()) {
        prop_assert_eq!(model.validate(), Ok(()));
        let text = render(&model);
        prop_assert_eq!(&render(&model.clone()), &text);
        prop_assert_eq!(parse(&text), Ok(model));
    }

    /// Whatever a model holds (even out of bounds), its rendering is the header followed by
    /// `key = value` lines only, one per value the model has, each value free of anything
    /// that could start another line, a comment or a second assignment.
    #[test]
    fn every_rendered_line_is_the_header_or_one_field(model in any_model()) {
        let text = render(&model);
        prop_assert!(text.starts_with(HEADER));
        let mut counts = BTreeMap::new();
        for line in text[HEADER.len()..].lines() {
            let (key, value) = line.split_once(" = ").expect("key = value");
            prop_assert!(!value.is_empty());
            prop_assert!(
                value.chars().all(|c| c.is_ascii_graphic() && !"=#;[\"".contains(c)),
                "{:?}", line
            );
            *counts.entry(key).or_insert(0usize) += 1;
        }
        prop_assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected_lines(&model).into_iter().collect::<Vec<_>>());
        prop_assert_eq!(text.matches('\n').count(), text.lines().count());
    }

    /// A string holding a hostile character can never become a value of the model: the only
    /// text-bearing type refuses it, and so do the address and network parsers.
    #[test]
    fn hostile_strings_never_enter_the_model(
        before in "[a-z0-9.:/]{1,20}",
        bad in hostile_char(),
        after in "[a-z0-9.:/]{1,20}",
    ) {
        let s = format!("{before}{bad}{after}");
        prop_assert!(DomainName::new(&s).is_err(), "{:?}", s);
        prop_assert!(s.parse::<IpNet>().is_err(), "{:?}", s);
        prop_assert!(s.parse::<IpAddr>().is_err(), "{:?}", s);
        if s.chars().any(char::is_control) {
            prop_assert!(Kind::User.check_name(&s).is_err(), "{:?}", s);
            prop_assert!(Kind::Group.check_name(&s).is_err(), "{:?}", s);
        }
        // The same string as the value of a line is refused, never half-read.
        for key in ["split-dns", "route", "dns", "hostname"] {
            let text = format!("{key} = {s}\n");
            prop_assert!(parse(&text).is_err(), "{:?}", text);
        }
    }

    /// Parsing arbitrary text never panics; whatever it accepts renders and parses back to the
    /// same model.
    #[test]
    fn parse_accepts_only_what_renders_back(
        lines in proptest::collection::vec(
            prop_oneof![
                "[a-z_-]{1,24} ?= ?[ -~]{0,30}",
                "(route|dns|split-dns|mtu|no-udp|ipv4-network|ipv4-netmask) = [0-9a-f.:/]{0,20}",
                "\\PC{0,40}",
            ],
            0..8,
        ),
    ) {
        let text = lines.join("\n");
        if let Ok(model) = parse(&text) {
            prop_assert_eq!(parse(&render(&model)), Ok(model));
        }
    }
}
