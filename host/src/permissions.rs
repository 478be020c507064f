//! Host-side permissions of a handler: which subjects it may publish to and
//! send requests to. Everything not granted is denied.
//!
//! These fence handlers within one tenant. Fencing tenants from each other is
//! the NATS server's job (accounts), not this module's.

use std::collections::BTreeMap;

use crate::manifest::BucketName;
use crate::subject::{Subject, SubjectPattern};

/// Access to a bucket. `Write` implies `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Get, list, watch.
    Read,
    /// Everything `Read` allows, plus put, create, update, delete, purge.
    Write,
}

/// What a handler's manifest grants under `[permissions]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the handler may publish to.
    pub publish: Vec<SubjectPattern>,
    /// Subjects the handler may send requests to.
    pub request: Vec<SubjectPattern>,
    /// KV buckets and the access granted to each.
    pub kv: BTreeMap<BucketName, Access>,
    /// Object-store buckets and the access granted to each.
    pub object: BTreeMap<BucketName, Access>,
}

impl Permissions {
    /// Whether `kv` grants at least `need` on `bucket`.
    pub fn kv_allows(&self, bucket: &BucketName, need: Access) -> bool {
        self.kv.get(bucket).is_some_and(|granted| *granted >= need)
    }

    /// Whether `object` grants at least `need` on `bucket`.
    pub fn object_allows(&self, bucket: &BucketName, need: Access) -> bool {
        self.object.get(bucket).is_some_and(|granted| *granted >= need)
    }

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
            ..Default::default()
        };
        assert!(p.may_publish(&"audit.a.b".parse().unwrap()));
        assert!(p.may_publish(&"orders.1.done".parse().unwrap()));
        assert!(!p.may_publish(&"orders.1.2.done".parse().unwrap()));
        assert!(!p.may_publish(&"pricing.quote".parse().unwrap()));
        assert!(p.may_request(&"pricing.quote".parse().unwrap()));
        assert!(!p.may_request(&"audit.x".parse().unwrap()));
    }

    #[test]
    fn write_implies_read_and_buckets_are_separate() {
        let (config, carts, other) = ("config".parse().unwrap(), "carts".parse().unwrap(), "other".parse().unwrap());
        let p =
            Permissions { kv: BTreeMap::from([(config, Access::Read), (carts, Access::Write)]), ..Default::default() };
        let (config, carts) = ("config".parse().unwrap(), "carts".parse().unwrap());
        assert!(p.kv_allows(&config, Access::Read) && !p.kv_allows(&config, Access::Write));
        assert!(p.kv_allows(&carts, Access::Read) && p.kv_allows(&carts, Access::Write));
        assert!(!p.kv_allows(&other, Access::Read));
        assert!(!p.object_allows(&carts, Access::Read), "kv grants say nothing about object buckets");
    }
}
