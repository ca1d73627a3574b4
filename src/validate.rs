//! Validation of names that reach paths, ocserv files or ocserv commands (DESIGN §5).
//!
//! A name is refused when it is empty, too long, contains `/`, NUL, a control character or a
//! newline, or starts with `-` or `.`. The error names the field and the reason.
//!
//! A name that becomes a file name (a config-per-user or config-per-group file, [`file_name`])
//! follows the same rule with a tighter length bound, [`MAX_FILE_NAME_LEN`].
//!
//! A session id (`safe_id`, occtl's "Full session") has one rule too, [`safe_id`], used by both
//! backends before an id becomes a control-socket request or an occtl argument.

/// Longest accepted user or group name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused; `field` names the input it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct NameError {
    pub field: &'static str,
    pub reason: String,
}

/// Longest accepted name of a config-per-user or config-per-group file, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 64;

/// Checks a user or group name; `field` is used in the error ("username", "groupname", ...).
pub fn name(field: &'static str, value: &str) -> Result<(), NameError> {
    bounded_name(field, value, MAX_NAME_LEN)
}

/// Checks a user or group name that becomes a file name in ocserv's config-per-user or
/// config-per-group directory: the [`name`] rule with the bound [`MAX_FILE_NAME_LEN`].
pub fn file_name(field: &'static str, value: &str) -> Result<(), NameError> {
    bounded_name(field, value, MAX_FILE_NAME_LEN)
}

/// The one name rule; only the length bound differs between its uses.
fn bounded_name(field: &'static str, value: &str, max_len: usize) -> Result<(), NameError> {
    let err = |reason: String| Err(NameError { field, reason });
    if value.is_empty() {
        return err("must not be empty".into());
    }
    if value.len() > max_len {
        return err(format!(
            "is {} bytes long, the limit is {max_len}",
            value.len()
        ));
    }
    if value.starts_with('-') || value.starts_with('.') {
        return err("must not start with '-' or '.'".into());
    }
    if let Some(c) = value.chars().find(|c| *c == '/' || c.is_control()) {
        return err(format!("must not contain {c:?}"));
    }
    Ok(())
}

/// Checks a username.
pub fn username(value: &str) -> Result<(), NameError> {
    name("username", value)
}

/// Longest accepted session id, in bytes (ocserv's are 28).
pub const MAX_SAFE_ID_LEN: usize = 64;

/// Checks a session id (`safe_id`): 1 to [`MAX_SAFE_ID_LEN`] bytes, each from the standard
/// base64 alphabet `A-Z a-z 0-9 + / =`.
///
/// ocserv's ids are 28 characters of standard base64 (20 random bytes); the bound leaves room
/// for longer ids without letting a caller send arbitrary text. Nothing else is accepted: no
/// URL-safe `-`/`_` (ocserv never makes them), no whitespace (occtl re-splits its command line),
/// no NUL (ocserv appends its own). The field in the error is `"safe_id"`.
pub fn safe_id(value: &str) -> Result<(), NameError> {
    let err = |reason: String| {
        Err(NameError {
            field: "safe_id",
            reason,
        })
    };
    if value.is_empty() || value.len() > MAX_SAFE_ID_LEN {
        return err(format!(
            "must be 1 to {MAX_SAFE_ID_LEN} base64 characters, got {} bytes",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=')))
    {
        return err(format!(
            "must contain only base64 characters (A-Z a-z 0-9 + / =), found {c:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_and_utf8_names() {
        for n in [
            "alice",
            "bob.smith",
            "user@example.com",
            "Jürgen",
            "ユーザー",
            "a-b_c",
        ] {
            assert_eq!(username(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_dangerous_names_with_reason() {
        for (n, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("../x", "start"),
            (".hidden", "start"),
            ("-rf", "start"),
            ("a\nb", "'\\n'"),
            ("a\0b", "'\\0'"),
            ("a\u{7f}", "'\\u{7f}'"),
        ] {
            let e = username(n).unwrap_err();
            assert_eq!(e.field, "username");
            assert!(e.reason.contains(why), "{n:?}: {}", e.reason);
        }
        assert!(username(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(username(&"x".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn file_names_follow_the_name_rule_with_a_64_byte_bound() {
        assert_eq!(
            file_name("username", &"x".repeat(MAX_FILE_NAME_LEN)),
            Ok(())
        );
        let e = file_name("groupname", &"x".repeat(MAX_FILE_NAME_LEN + 1)).unwrap_err();
        assert_eq!(e.field, "groupname");
        assert!(
            e.reason.contains("65 bytes") && e.reason.contains("64"),
            "{}",
            e.reason
        );
        // 64 bytes of a multi-byte script is fewer characters: the bound is in bytes.
        assert_eq!(file_name("username", &"é".repeat(32)), Ok(()));
        assert!(file_name("username", &"é".repeat(33)).is_err());
        for bad in ["", "a/b", ".x", "-x", "a\nb", "a\0b", "a\tb"] {
            let e = file_name("username", bad).unwrap_err();
            assert_eq!(e.field, "username", "{bad:?}");
        }
    }

    #[test]
    fn safe_id_is_base64_of_bounded_length() {
        for ok in [
            "AbCdEfGhIjKlMnOpQrStUvWxYz0=",
            "GDnAGg6Vqa8411Hw9xjkUEGvwSg=",
            "a+/=",
            "x",
        ] {
            assert_eq!(safe_id(ok), Ok(()), "{ok}");
        }
        assert!(safe_id(&"A".repeat(MAX_SAFE_ID_LEN)).is_ok());
        for bad in ["", "a b", "a-b", "a_b", "ab\0", "ab\n", "../x", "é"] {
            let e = safe_id(bad).unwrap_err();
            assert_eq!(e.field, "safe_id", "{bad:?}");
        }
        let e = safe_id(&"A".repeat(MAX_SAFE_ID_LEN + 1)).unwrap_err();
        assert!(e.reason.contains("65 bytes"), "{}", e.reason);
    }

    /// A character no name may contain: C0 controls (NUL and newline among them), DEL, C1
    /// controls, or `/`.
    fn forbidden_char() -> impl Strategy<Value = char> {
        prop_oneof![
            (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
            Just('\u{7f}'),
            (0x80u32..0xa0).prop_map(|c| char::from_u32(c).unwrap()),
            Just('/'),
            Just('\0'),
            Just('\n'),
        ]
    }

    proptest! {
        /// Any name with a forbidden character anywhere is refused, naming that character.
        #[test]
        fn names_with_control_chars_slash_or_nul_are_refused(
            before in "\\PC{0,40}",
            bad in forbidden_char(),
            after in "\\PC{0,40}",
        ) {
            let s = format!("{before}{bad}{after}");
            let e = username(&s).unwrap_err();
            prop_assert_eq!(e.field, "username");
            // Unless the name was refused for its start or length first, the reason names a
            // forbidden character.
            if !s.starts_with(['-', '.']) && s.len() <= MAX_NAME_LEN {
                prop_assert!(e.reason.contains("must not contain"), "{:?}: {}", s, e.reason);
            }
        }

        /// A leading `-` or `.` is refused whatever follows.
        #[test]
        fn names_starting_with_dash_or_dot_are_refused(
            lead in prop_oneof![Just('-'), Just('.')],
            rest in "\\PC{0,60}",
        ) {
            let s = format!("{lead}{rest}");
            let e = username(&s).unwrap_err();
            // Unless refused for its length first, the reason is the start.
            if s.len() <= MAX_NAME_LEN {
                prop_assert!(e.reason.contains("start"), "{:?}: {}", s, e.reason);
            }
        }

        /// Ordinary names, ASCII or any printable Unicode (letters of every script, emoji,
        /// spaces inside), are accepted when they start with neither `-` nor `.`.
        #[test]
        fn ordinary_and_utf8_names_are_accepted(
            first in "[\\p{L}\\p{N}_@]",
            rest in "[\\p{L}\\p{N}\\p{M}\\p{S}\\p{P} ]{0,30}",
        ) {
            let s = format!("{first}{rest}");
            prop_assume!(!s.contains('/') && s.len() <= MAX_NAME_LEN);
            prop_assert_eq!(username(&s), Ok(()), "{:?}", s);
            prop_assert_eq!(name("groupname", &s), Ok(()), "{:?}", s);
        }

        /// Exactly the base64 alphabet at a bounded length passes the session id rule.
        #[test]
        fn safe_id_accepts_exactly_bounded_base64(s in "\\PC{0,80}|[A-Za-z0-9+/=]{0,80}") {
            let expected = !s.is_empty()
                && s.len() <= MAX_SAFE_ID_LEN
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            prop_assert_eq!(safe_id(&s).is_ok(), expected, "{:?}", s);
        }

        /// A file name is accepted exactly when the name rule accepts it and it fits in 64 bytes.
        #[test]
        fn file_name_is_name_within_64_bytes(s in "\\PC{0,80}|[a-z./-]{0,80}") {
            let expected = name("username", &s).is_ok() && s.len() <= MAX_FILE_NAME_LEN;
            prop_assert_eq!(file_name("username", &s).is_ok(), expected, "{:?}", s);
        }

        #[test]
        fn accepted_names_are_safe_path_components(s in "\\PC{0,200}") {
            if username(&s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN);
                prop_assert!(!s.contains('/') && !s.chars().any(char::is_control));
                prop_assert!(!s.starts_with('.') && !s.starts_with('-'));
            }
        }
    }
}
