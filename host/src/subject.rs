//! NATS subjects as types: a concrete [`Subject`] that can be published to,
//! and a [`SubjectPattern`] that may hold `*` and `>` wildcards and is used for
//! subscriptions and permission grants.
//!
//! Validation happens once, when a string becomes one of these types, so the
//! rest of the host never re-checks a subject. The rules are the NATS ones:
//! tokens are separated by `.`, no token is empty, no whitespace anywhere, `*`
//! matches exactly one token, and `>` matches one or more tokens and may only
//! be the last token.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid subject or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The string is empty.
    #[error("subject is empty")]
    Empty,
    /// Two dots in a row, or a leading or trailing dot.
    #[error("`{0}` has an empty token (a leading, trailing or doubled `.`)")]
    EmptyToken(String),
    /// Spaces, tabs or line breaks are never allowed in a subject.
    #[error("`{0}` contains whitespace")]
    Whitespace(String),
    /// `>` appears before the last token.
    #[error("`{0}`: `>` may only be the last token")]
    TailNotLast(String),
    /// A wildcard character is part of a longer token, such as `foo*`.
    #[error("`{0}`: wildcards `*` and `>` must be whole tokens")]
    PartialWildcard(String),
    /// A wildcard where a concrete subject is needed (publishing).
    #[error("`{0}` contains a wildcard; a concrete subject is needed here")]
    Wildcard(String),
}

/// Checks the token structure shared by subjects and patterns, and returns
/// whether the string contains a wildcard token.
fn check(s: &str) -> Result<bool, SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.chars().any(char::is_whitespace) {
        return Err(SubjectError::Whitespace(s.to_owned()));
    }
    let mut wildcard = false;
    let mut tokens = s.split('.').peekable();
    while let Some(token) = tokens.next() {
        match token {
            "" => return Err(SubjectError::EmptyToken(s.to_owned())),
            "*" => wildcard = true,
            ">" if tokens.peek().is_some() => return Err(SubjectError::TailNotLast(s.to_owned())),
            ">" => wildcard = true,
            t if t.contains(['*', '>']) => return Err(SubjectError::PartialWildcard(s.to_owned())),
            _ => {}
        }
    }
    Ok(wildcard)
}

/// A concrete subject: valid, and without wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    /// The subject as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The subject's string, without copying it.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl FromStr for Subject {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.to_owned().try_into()
    }
}

/// Validates a subject a guest handed over, keeping its string rather than
/// copying it: sends check one per message.
impl TryFrom<String> for Subject {
    type Error = SubjectError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if check(&s)? {
            return Err(SubjectError::Wildcard(s));
        }
        Ok(Subject(s))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subject pattern: a valid subject that may contain `*` and `>` tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectPattern(String);

impl SubjectPattern {
    /// The pattern as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `subject` is matched by this pattern, with NATS semantics:
    /// `*` stands for one token and a final `>` for one or more.
    pub fn matches(&self, subject: &Subject) -> bool {
        let mut want = self.0.split('.');
        let mut have = subject.as_str().split('.');
        loop {
            match (want.next(), have.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(w), Some(h)) if w == h => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl FromStr for SubjectPattern {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check(s)?;
        Ok(SubjectPattern(s.to_owned()))
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SubjectPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> SubjectPattern {
        s.parse().unwrap()
    }
    fn sub(s: &str) -> Subject {
        s.parse().unwrap()
    }

    #[test]
    fn rejects_malformed_subjects() {
        assert_eq!("".parse::<SubjectPattern>(), Err(SubjectError::Empty));
        for bad in ["a..b", ".a", "a.", "."] {
            assert!(matches!(bad.parse::<SubjectPattern>(), Err(SubjectError::EmptyToken(_))), "{bad}");
        }
        for bad in ["a b", "a\tb", "a.b\n"] {
            assert!(matches!(bad.parse::<SubjectPattern>(), Err(SubjectError::Whitespace(_))), "{bad}");
        }
        assert!(matches!("a.>.b".parse::<SubjectPattern>(), Err(SubjectError::TailNotLast(_))));
        assert!(matches!("a.b*".parse::<SubjectPattern>(), Err(SubjectError::PartialWildcard(_))));
        assert!(matches!("a.>b".parse::<SubjectPattern>(), Err(SubjectError::PartialWildcard(_))));
        assert!(matches!("a.*".parse::<Subject>(), Err(SubjectError::Wildcard(_))));
        assert!(matches!("a.>".parse::<Subject>(), Err(SubjectError::Wildcard(_))));
    }

    #[test]
    fn accepts_wildcards_as_whole_tokens() {
        for good in ["a", "a.b.c", "*", ">", "a.*.c", "a.>", "*.*.>", "$JS.API.>", "_INBOX.x"] {
            assert!(good.parse::<SubjectPattern>().is_ok(), "{good}");
        }
    }

    #[test]
    fn matches_like_nats() {
        assert!(pat("a.b").matches(&sub("a.b")));
        assert!(!pat("a.b").matches(&sub("a.b.c")));
        assert!(!pat("a.b.c").matches(&sub("a.b")));
        assert!(pat("a.*").matches(&sub("a.b")));
        assert!(!pat("a.*").matches(&sub("a.b.c")));
        assert!(!pat("a.*").matches(&sub("a")));
        assert!(pat("a.*.c").matches(&sub("a.x.c")));
        assert!(!pat("a.*.c").matches(&sub("a.x.d")));
        assert!(pat("a.>").matches(&sub("a.b")));
        assert!(pat("a.>").matches(&sub("a.b.c.d")));
        assert!(!pat("a.>").matches(&sub("a")));
        assert!(pat(">").matches(&sub("anything.at.all")));
        assert!(pat("*.b.>").matches(&sub("x.b.y")));
        assert!(!pat("*.b.>").matches(&sub("x.b")));
    }
}
