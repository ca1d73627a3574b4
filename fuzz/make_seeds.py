#!/usr/bin/env python3
"""Regenerates fuzz/seeds/ from real material (see fuzz/README.md).

ctl_reply: hand-encoded protobuf reply frames laid out as ocserv sends them (code byte, u32 LE
body length, body), with field numbers from proto/ocserv/ctl.proto. Each seed starts with the
fuzz target's control byte.
occtl_json has no seeds here: its runs read the recorded fixtures in tests/fixtures/occtl/
directly (a second, read-only corpus directory), so they are not duplicated.
proc_net_dev: a /proc/net/dev text in the kernel's layout.
config_toml: examples/agent.toml and a minimal file.
"""
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def zigzag32(n):
    return (n << 1) ^ (n >> 31)


def f_varint(field, n):
    return varint(field << 3) + varint(n)


def f_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def frame(code, body):
    return bytes([code]) + struct.pack("<I", len(body)) + body


def user(uid, name, ip, vpn, tun, safe_id):
    return b"".join([
        f_varint(1, zigzag32(uid)),
        f_bytes(2, name),
        f_bytes(3, "staff"),
        f_bytes(4, ip),
        f_bytes(5, tun),
        f_bytes(6, "192.168.99.1"),
        f_bytes(7, vpn),
        f_bytes(9, "fd00::2"),
        f_varint(10, 1_700_000_000),
        f_bytes(11, "laptop"),
        f_bytes(12, "OpenConnect-GUI 1.5.3"),
        f_varint(13, 5),
        f_bytes(14, "(TLS1.3)-(ECDHE-SECP256R1)-(RSA-PSS-RSAE-SHA256)-(AES-256-GCM)"),
        f_bytes(18, "192.168.99.1"),
        f_bytes(20, "10.0.0.0/8"),
        f_varint(22, 1400),
        f_bytes(32, safe_id),
    ])


def ctl_reply():
    users = f_bytes(1, user(4242, "alice", "127.0.0.2", "192.168.99.10", "vpns0", b"\x01" * 20))
    users += f_bytes(1, user(4243, "bob", "::1", "192.168.99.11", "vpns1", b"\xab" * 20))
    status = b"".join([
        f_varint(1, 1), f_varint(2, 1234), f_varint(3, 1235), f_varint(3, 1236),
        f_varint(4, 2), f_varint(5, 1_700_000_000), f_varint(8, 1), f_varint(13, 7),
        f_varint(14, 1024), f_varint(15, 2048), f_varint(23, 3), f_varint(24, 70),
        f_varint(25, 9),
    ])
    bans = f_bytes(1, f_bytes(1, bytes([127, 0, 0, 9])) + f_varint(2, 30) + f_varint(3, 1_700_000_600))
    bans += f_bytes(1, f_bytes(1, bytes(15) + b"\x01") + f_varint(2, 10))
    bans += f_bytes(1, f_bytes(1, "127.0.0.8\0") + f_varint(2, 5))
    cookie = b"".join([
        f_bytes(1, b"\x02" * 20), f_varint(2, 1), f_varint(3, 1), f_varint(4, 1_700_000_000),
        f_bytes(5, "alice"), f_bytes(6, "staff"), f_bytes(7, "OpenConnect"),
        f_bytes(8, "127.0.0.2"), f_varint(9, 1_700_003_600), f_varint(10, 5), f_varint(11, 1),
        f_bytes(12, "default"),
    ])
    cookies = f_bytes(1, cookie)
    seeds = {
        "list": frame(104, users),
        "list-empty": frame(104, b""),
        "status": frame(101, status),
        "bans": frame(108, bans),
        "cookies": frame(110, cookies),
        "bool-true": frame(105, f_varint(1, 1)),
        "bool-false": frame(111, f_varint(1, 0)),
        # Several replies back to back, as a reused connection would deliver them.
        "stream": frame(101, status) + frame(104, users) + frame(107, f_varint(1, 1)),
        # A frame cut short: finish() must report it.
        "truncated": frame(104, users)[:40],
        # A header announcing 16 MiB + 1 bytes: refused as soon as the header is read.
        "oversize": bytes([101]) + struct.pack("<I", 16 * 1024 * 1024 + 1),
    }
    out = SEEDS / "ctl_reply"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        # Control byte 0x00: default limit; 0x85: small limit, other chunking.
        (out / f"{name}").write_bytes(b"\x00" + data)
    (out / "stream-small-limit").write_bytes(b"\x85" + seeds["stream"])


def proc_net_dev():
    out = SEEDS / "proc_net_dev"
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
    )
    lines = (
        "    lo:   12345     100    0    0    0     0          0         0    12345     100    0    0    0     0       0          0\n"
        "  eth0: 98765432   54321    0    0    0     0          0         0  1234567    4321    0    0    0     0       0          0\n"
        " vpns0:18446744073709551615 1 0 0 0 0 0 0 18446744073709551615 1 0 0 0 0 0 0\n"
    )
    (out / "net-dev").write_text(header + lines)
    (out / "named-device").write_text("vpns1\n" + header + lines.replace("vpns0", "vpns1"))


def config_toml():
    out = SEEDS / "config_toml"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "examples" / "agent.toml", out / "agent.toml")
    (out / "minimal.toml").write_text('[ocserv]\nbackend = "occtl"\nrequest_timeout = "250ms"\n')


if __name__ == "__main__":
    ctl_reply()
    proc_net_dev()
    config_toml()
