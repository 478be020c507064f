//! Host-side permissions of a handler: which subjects it may publish to and
//! send requests to. Everything not granted is denied.
//!
//! These fence handlers within one tenant. Fencing tenants from each other is
//! the NATS server's job (accounts), not this module's.

use crate::subject::{Subject, SubjectPattern};

/// What a handler's manifest grants under `[permissions]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the handler may publish to.
    pub publish: Vec<SubjectPattern>,
    /// Subjects the handler may send requests to.
    pub request: Vec<SubjectPattern>,
}

impl Permissions {
    /// Whether the handler may publish to `subject`.
    pub fn may_publish(&self, subject: &Subject) -> bool {
        self.publish.iter().any(|p| p.matches(subject))
    }

    /// Whether the handler may send a request to `subject`.
    pub fn may_request(&self, subject: &Subject) -> bool {
        self.request.iter().any(|p| p.matches(subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_denies_everything() {
        let p = Permissions::default();
        assert!(!p.may_publish(&"a".parse().unwrap()));
        assert!(!p.may_request(&"a".parse().unwrap()));
    }

    #[test]
    fn grants_use_wildcards_and_are_separate() {
        let p = Permissions {
            publish: vec!["audit.>".parse().unwrap(), "orders.*.done".parse().unwrap()],
            request: vec!["pricing.quote".parse().unwrap()],
        };
        assert!(p.may_publish(&"audit.a.b".parse().unwrap()));
        assert!(p.may_publish(&"orders.1.done".parse().unwrap()));
        assert!(!p.may_publish(&"orders.1.2.done".parse().unwrap()));
        assert!(!p.may_publish(&"pricing.quote".parse().unwrap()));
        assert!(p.may_request(&"pricing.quote".parse().unwrap()));
        assert!(!p.may_request(&"audit.x".parse().unwrap()));
    }
}
