//! The structural-schema rules the Kubernetes API server enforces on apiextensions.k8s.io/v1 CRD
//! schemas, and the keywords it rejects, as a checker over k8s-openapi's `JSONSchemaProps` (used by
//! deploy.rs, the integration test this file belongs to).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

/// Structural-schema rules the API server enforces for apiextensions.k8s.io/v1, and the keywords
/// it rejects. Appends one message per violation, with its path.
pub fn structural(s: &JSONSchemaProps, path: &str, in_junctor: bool, errs: &mut Vec<String>) {
    let mut err = |m: &str| errs.push(format!("{path}: {m}"));
    let rejected = [
        ("$ref", s.ref_path.is_some()),
        ("$schema", s.schema.is_some()),
        ("definitions", s.definitions.is_some()),
        ("dependencies", s.dependencies.is_some()),
        ("id", s.id.is_some()),
        ("patternProperties", s.pattern_properties.is_some()),
        ("additionalItems", s.additional_items.is_some()),
        ("uniqueItems: true", s.unique_items == Some(true)),
        ("x-kubernetes-preserve-unknown-fields: false", s.x_kubernetes_preserve_unknown_fields == Some(false)),
    ];
    for (kw, bad) in rejected {
        if bad {
            err(&format!("{kw} is not allowed in a CRD schema"));
        }
    }
    if in_junctor {
        // Inside allOf/anyOf/oneOf/not only value validations are allowed.
        let structural_kw = [
            ("type", s.type_.is_some()),
            ("description", s.description.is_some()),
            ("default", s.default.is_some()),
            ("nullable", s.nullable.is_some()),
            ("title", s.title.is_some()),
            ("additionalProperties", s.additional_properties.is_some()),
            (
                "x-kubernetes-*",
                s.x_kubernetes_preserve_unknown_fields.is_some() || s.x_kubernetes_int_or_string.is_some(),
            ),
        ];
        for (kw, bad) in structural_kw {
            if bad {
                err(&format!("{kw} inside allOf/anyOf/oneOf/not (only value validations may go there)"));
            }
        }
    } else if s.type_.as_deref().unwrap_or("").is_empty()
        && s.x_kubernetes_int_or_string != Some(true)
        && s.x_kubernetes_preserve_unknown_fields != Some(true)
    {
        err("no type (every level of a structural schema needs one)");
    }
    if let Some(t) = s.type_.as_deref()
        && !["object", "array", "string", "integer", "number", "boolean"].contains(&t)
    {
        err(&format!("type {t:?} is not an OpenAPI v3 type"));
    }
    if s.properties.is_some() && s.additional_properties.is_some() {
        err("properties and additionalProperties are mutually exclusive");
    }
    let type_ok = |v: &Value| match s.type_.as_deref() {
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        _ => true,
    };
    for e in s.enum_.iter().flatten() {
        if !type_ok(&e.0) {
            err(&format!("enum value {} is not a {:?}", e.0, s.type_));
        }
    }
    if let Some(d) = &s.default {
        if !type_ok(&d.0) {
            err(&format!("default {} is not a {:?}", d.0, s.type_));
        }
        if let Some(e) = &s.enum_
            && !e.iter().any(|e| e.0 == d.0)
        {
            err(&format!("default {} is not one of the enum values", d.0));
        }
    }
    if let Some(lt) = s.x_kubernetes_list_type.as_deref() {
        if !["atomic", "set", "map"].contains(&lt) || s.type_.as_deref() != Some("array") {
            err(&format!("x-kubernetes-list-type {lt:?} (atomic, set or map, on arrays)"));
        }
        if lt == "map" && s.x_kubernetes_list_map_keys.as_ref().is_none_or(Vec::is_empty) {
            err("x-kubernetes-list-type map needs x-kubernetes-list-map-keys");
        }
    }
    if !in_junctor
        && s.type_.as_deref() == Some("object")
        && let Some(p) = &s.properties
        && let Some(req) = &s.required
    {
        for r in req.iter().filter(|r| !p.contains_key(*r)) {
            err(&format!("required {r:?} is not among the properties"));
        }
    }
    for (k, p) in s.properties.iter().flatten() {
        structural(p, &format!("{path}.{k}"), in_junctor, errs);
    }
    match &s.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(p)) => {
            structural(p, &format!("{path}.additionalProperties"), in_junctor, errs)
        }
        Some(JSONSchemaPropsOrBool::Bool(false)) => {
            errs.push(format!("{path}: additionalProperties: false (unknown fields are pruned instead)"))
        }
        _ => {}
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(p)) => structural(p, &format!("{path}.items"), in_junctor, errs),
        Some(JSONSchemaPropsOrArray::Schemas(_)) => errs.push(format!("{path}: items must be one schema, not a list")),
        None if s.type_.as_deref() == Some("array") && !in_junctor => {
            errs.push(format!("{path}: an array needs items"))
        }
        None => {}
    }
    for (kw, list) in [("allOf", &s.all_of), ("anyOf", &s.any_of), ("oneOf", &s.one_of)] {
        for (i, j) in list.iter().flatten().enumerate() {
            structural(j, &format!("{path}.{kw}[{i}]"), true, errs);
        }
    }
    if let Some(n) = &s.not {
        structural(n, &format!("{path}.not"), true, errs);
    }
}
