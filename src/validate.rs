//! Validation of names that reach paths, ocserv files or ocserv commands (DESIGN §5).
//!
//! A name is refused when it is empty, too long, contains `/`, NUL, a control character or a
//! newline, or starts with `-` or `.`. The error names the field and the reason.

/// Longest accepted user or group name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused; `field` names the input it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct NameError {
    pub field: &'static str,
    pub reason: String,
}

/// Checks a user or group name; `field` is used in the error ("username", "groupname", ...).
pub fn name(field: &'static str, value: &str) -> Result<(), NameError> {
    let err = |reason: String| Err(NameError { field, reason });
    if value.is_empty() {
        return err("must not be empty".into());
    }
    if value.len() > MAX_NAME_LEN {
        return err(format!(
            "is {} bytes long, the limit is {MAX_NAME_LEN}",
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

    proptest! {
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
