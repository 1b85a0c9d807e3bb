//! Label and field selectors, the equality-based subset the API server supports.

use serde_json::Value;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Selector(Vec<(String, Op)>);

impl Selector {
    /// Parses a label selector: `key`, `!key`, `key=value`, `key==value`, `key!=value`, comma-separated.
    pub(super) fn labels(text: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, op) = if let Some(key) = term.strip_prefix('!') {
                (key, Op::NotExists)
            } else if let Some((key, value)) = term.split_once("!=") {
                (key, Op::NotEq(value.trim().to_owned()))
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (key, Op::Eq(value.trim().to_owned()))
            } else {
                (term, Op::Exists)
            };
            let key = key.trim();
            if key.is_empty() || key.contains([' ', '(', ')', '=', '!']) {
                return Err(format!("unable to parse requirement: {term:?}"));
            }
            reqs.push((key.to_owned(), op));
        }
        Ok(Self(reqs))
    }

    /// Parses a field selector; only `metadata.name` and `metadata.namespace` with `=`, `==` or `!=`.
    pub(super) fn fields(text: &str) -> Result<Self, String> {
        let selector = Self::labels(text)?;
        for (key, op) in &selector.0 {
            if !matches!(key.as_str(), "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {key}"));
            }
            if matches!(op, Op::Exists | Op::NotExists) {
                return Err(format!("invalid field selector requirement for {key}"));
            }
        }
        Ok(selector)
    }

    /// Whether the selector has no requirement (selects everything).
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every requirement holds, looking values up with `get`.
    fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|(key, op)| match op {
            Op::Exists => get(key).is_some(),
            Op::NotExists => get(key).is_none(),
            Op::Eq(value) => get(key) == Some(value.as_str()),
            Op::NotEq(value) => get(key) != Some(value.as_str()),
        })
    }

    /// Matches against `metadata.labels` of a stored object.
    pub(super) fn matches_labels(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.matches(|key| labels.get(key).and_then(Value::as_str))
    }

    /// Matches against `metadata.name` / `metadata.namespace` of a stored object.
    pub(super) fn matches_fields(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        self.matches(|key| match key {
            "metadata.name" => meta["name"].as_str(),
            // Cluster-scoped objects have the empty namespace.
            "metadata.namespace" => Some(meta["namespace"].as_str().unwrap_or_default()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let obj = json!({"metadata": {"name": "a", "labels": {"app": "web", "tier": "front"}}});
        let yes = ["", "app", "!missing", "app=web", "app==web", "app!=db", "missing!=x", "app=web,tier"];
        let no = ["missing", "!app", "app=db", "app!=web", "app=web,tier=back"];
        for s in yes {
            assert!(Selector::labels(s).unwrap().matches_labels(&obj), "{s}");
        }
        for s in no {
            assert!(!Selector::labels(s).unwrap().matches_labels(&obj), "{s}");
        }
        assert!(Selector::labels("app in (a,b)").is_err());
    }

    #[test]
    fn field_selectors() {
        let obj = json!({"metadata": {"name": "node-1"}});
        assert!(Selector::fields("metadata.name=node-1").unwrap().matches_fields(&obj));
        assert!(!Selector::fields("metadata.name=node-2").unwrap().matches_fields(&obj));
        assert!(Selector::fields("metadata.namespace=").unwrap().matches_fields(&obj));
        assert!(Selector::fields("spec.nodeName=x").is_err());
        assert!(Selector::fields("metadata.name").is_err());
    }
}
