//! Checks JSON bodies against the component schemas of
//! `cloud-hypervisor-openapi.yaml` (a copy of the reference kept beside this
//! file). Strict the way cloud-hypervisor's serde is: required fields, JSON
//! types, enums, minimums, and no unknown fields on objects that list their
//! properties. The fake VMM uses it on every request body; tests use it on
//! what the driver sends.

use std::collections::BTreeMap;

use serde_json::Value;

/// The OpenAPI description the backend is written against.
pub const OPENAPI_YAML: &str = include_str!("cloud-hypervisor-openapi.yaml");

/// Why a body does not match its schema (the JSON path, then what is wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaViolation {
    pub path: String,
    pub message: String,
}

/// Why the description itself cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaLoadError {
    #[error("the OpenAPI description is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("the OpenAPI description has no components.schemas")]
    NoSchemas,
}

/// The component schemas, as JSON.
#[derive(Debug, Clone)]
pub struct Schemas {
    schemas: BTreeMap<String, Value>,
}

impl Schemas {
    /// The description shipped with Kiln.
    pub fn bundled() -> Self {
        Self::parse(OPENAPI_YAML).expect("the bundled OpenAPI description parses")
    }

    pub fn parse(yaml: &str) -> Result<Self, SchemaLoadError> {
        let doc: Value = serde_yaml_ng::from_str(yaml)?;
        let schemas = doc
            .pointer("/components/schemas")
            .and_then(Value::as_object)
            .ok_or(SchemaLoadError::NoSchemas)?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Self { schemas })
    }

    pub fn has(&self, name: &str) -> bool {
        self.schemas.contains_key(name)
    }

    /// Check `value` against the component schema `name`.
    pub fn validate(&self, name: &str, value: &Value) -> Result<(), SchemaViolation> {
        let schema = self.schemas.get(name).ok_or_else(|| SchemaViolation {
            path: "$".into(),
            message: format!("no schema named {name}"),
        })?;
        self.check(schema, value, "$")
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, SchemaViolation> {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.rsplit('/').next().unwrap_or(r);
                self.schemas.get(name).ok_or_else(|| SchemaViolation {
                    path: "$".into(),
                    message: format!("dangling reference {r}"),
                })
            }
            None => Ok(schema),
        }
    }

    fn check(&self, schema: &Value, value: &Value, path: &str) -> Result<(), SchemaViolation> {
        let schema = self.resolve(schema)?;
        let fail = |message: String| {
            Err(SchemaViolation {
                path: path.to_owned(),
                message,
            })
        };
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            let matches = allowed
                .iter()
                .any(|a| a == value || (a.as_str().is_some() && a.as_str() == value.as_str()));
            if !matches {
                return fail(format!("{value} is not one of {allowed:?}"));
            }
        }
        let ty = schema.get("type").and_then(Value::as_str);
        match ty {
            Some("object") => {
                let Some(obj) = value.as_object() else {
                    return fail(format!("expected an object, got {value}"));
                };
                if let Some(required) = schema.get("required").and_then(Value::as_array) {
                    for r in required.iter().filter_map(Value::as_str) {
                        if !obj.contains_key(r) {
                            return fail(format!("required field {r:?} is missing"));
                        }
                    }
                }
                let props = schema.get("properties").and_then(Value::as_object);
                let additional = schema.get("additionalProperties");
                for (k, v) in obj {
                    let sub = format!("{path}.{k}");
                    match (props.and_then(|p| p.get(k)), additional) {
                        (Some(s), _) => self.check(s, v, &sub)?,
                        (None, Some(Value::Bool(true))) => {}
                        (None, Some(s)) if s.is_object() => self.check(s, v, &sub)?,
                        (None, _) if props.is_none() && additional.is_none() => {}
                        (None, _) => return fail(format!("unknown field {k:?}")),
                    }
                }
            }
            Some("array") => {
                let Some(items) = value.as_array() else {
                    return fail(format!("expected an array, got {value}"));
                };
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{path}[{i}]"))?;
                    }
                }
            }
            Some("string") if !value.is_string() => {
                return fail(format!("expected a string, got {value}"));
            }
            Some("boolean") if !value.is_boolean() => {
                return fail(format!("expected a boolean, got {value}"));
            }
            Some("integer") => {
                if !(value.is_i64() || value.is_u64()) {
                    return fail(format!("expected an integer, got {value}"));
                }
                let unsigned = matches!(
                    schema.get("format").and_then(Value::as_str),
                    Some("uint8" | "uint16" | "uint32" | "uint64")
                );
                if unsigned && value.is_i64() && value.as_i64().is_some_and(|n| n < 0) {
                    return fail(format!("expected an unsigned integer, got {value}"));
                }
            }
            Some("number") if !value.is_number() => {
                return fail(format!("expected a number, got {value}"));
            }
            _ => {}
        }
        if let (Some(min), Some(n)) = (
            schema.get("minimum").and_then(Value::as_f64),
            value.as_f64(),
        ) {
            if n < min {
                return fail(format!("{value} is below the minimum {min}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_bundled_description_has_the_schemas_kiln_sends() {
        let s = Schemas::bundled();
        for name in ["VmConfig", "VmSnapshotConfig", "RestoreConfig", "VmInfo"] {
            assert!(s.has(name), "{name}");
        }
    }

    #[test]
    fn valid_bodies_pass() {
        let s = Schemas::bundled();
        s.validate(
            "VmConfig",
            &json!({
                "payload": {"kernel": "/k", "initramfs": "/i", "cmdline": "console=ttyS0"},
                "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                "memory": {"size": 134217728},
                "disks": [{"path": "/d", "readonly": true}],
                "net": [{"tap": "kvm-0"}],
                "vsock": {"cid": 3, "socket": "/v.sock"},
                "serial": {"mode": "File", "file": "/log"},
                "console": {"mode": "Off"}
            }),
        )
        .unwrap();
        s.validate(
            "RestoreConfig",
            &json!({"source_url": "file:///x", "resume": false}),
        )
        .unwrap();
        s.validate("VmCounters", &json!({"disk0": {"read_bytes": 5}}))
            .unwrap();
    }

    #[test]
    fn every_kind_of_mistake_is_named() {
        let s = Schemas::bundled();
        let err = |name: &str, v: Value| s.validate(name, &v).unwrap_err().to_string();
        assert!(err("VmConfig", json!({})).contains("\"payload\" is missing"));
        assert!(
            err("VmConfig", json!({"payload": {}, "cpu": {}})).contains("unknown field \"cpu\"")
        );
        assert!(err("VmConfig", json!({"payload": {"kernel": 5}})).contains("$.payload.kernel"));
        assert!(err(
            "VmConfig",
            json!({"payload": {}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}})
        )
        .contains("minimum"));
        assert!(
            err("VmConfig", json!({"payload": {}, "memory": {"size": "1G"}}))
                .contains("expected an integer")
        );
        assert!(err(
            "VmConfig",
            json!({"payload": {}, "serial": {"mode": "Loud"}})
        )
        .contains("is not one of"));
        assert!(err(
            "VmConfig",
            json!({"payload": {}, "vsock": {"cid": 2, "socket": "/s"}})
        )
        .contains("minimum"));
        assert!(err(
            "VmConfig",
            json!({"payload": {}, "disks": [{"path": null}]})
        )
        .contains("$.disks[0].path"));
        assert!(err("RestoreConfig", json!({"resume": true})).contains("source_url"));
        assert!(err("VmCounters", json!({"d": {"x": "1"}})).contains("integer"));
    }
}
