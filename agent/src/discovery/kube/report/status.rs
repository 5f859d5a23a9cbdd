//! HTTPRoute `status.parents` as a waypoint reports them: one entry per parentRef that names the
//! waypoint (its Gateway, or a Service it serves), `controllerName` [`ROUTE_CONTROLLER_NAME`], with
//! `Accepted` and `ResolvedRefs` conditions (and `PartiallyInvalid` when some rules were left out),
//! each with `observedGeneration` and a `lastTransitionTime` that only moves when the status does.
//!
//! Written as a JSON merge patch of the `status` subresource carrying the resourceVersion read just
//! before (optimistic concurrency: a 409 means someone else wrote, read again), with the field
//! manager [`FIELD_MANAGER`]. Not server-side apply: `status.parents` is an atomic list in the
//! Gateway API CRDs, so an apply would take other controllers' entries away; those entries are kept
//! as read.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use super::{FIELD_MANAGER, GATEWAY_GROUP, Problem, ROUTE_CONTROLLER_NAME};
use crate::crd::HTTPRoute;
use crate::state::State;

/// One condition before it is stamped with a generation and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What this waypoint says about one parentRef of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentStatus {
    /// The parentRef as the route spells it.
    pub parent_ref: Value,
    pub conditions: Vec<RouteCondition>,
}

fn ns_of(r: &HTTPRoute) -> &str {
    r.metadata.namespace.as_deref().unwrap_or("default")
}

fn name_of(r: &HTTPRoute) -> &str {
    r.metadata.name.as_deref().unwrap_or("")
}

/// The status entries waypoint `me_ns/me_name` owes `route`, given the problems its compilers found
/// (only those of this route are looked at). Empty when no parentRef names the waypoint.
pub fn route_parents(
    route: &HTTPRoute,
    state: &State,
    me_ns: &str,
    me_name: &str,
    problems: &[Problem],
) -> Vec<ParentStatus> {
    let ns = ns_of(route);
    let mine: Vec<Value> = route
        .spec
        .parent_refs
        .iter()
        .filter(|p| {
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
            let pns = p.namespace.as_deref().unwrap_or(ns);
            match (kind, group) {
                ("Gateway", GATEWAY_GROUP) => p.name == me_name && pns == me_ns,
                ("Service", "" | "core") => state
                    .service(pns, &p.name)
                    .and_then(|s| state.waypoint_of(s))
                    .is_some_and(|w| w.namespace == me_ns && w.name == me_name),
                _ => false,
            }
        })
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect();
    if mine.is_empty() {
        return Vec::new();
    }
    let own: Vec<&Problem> =
        problems.iter().filter(|p| p.kind == "HTTPRoute" && p.namespace == ns && p.name == name_of(route)).collect();
    let mut not_found = Vec::new();
    let mut bad_kind = Vec::new();
    let mut dropped_rules = BTreeSet::new();
    let mut invalid = Vec::new();
    for p in &own {
        let backend_part = p.field.contains(".backendRefs[") && !p.field.contains(".filters[");
        let note = p.note();
        if backend_part && p.field.ends_with(".kind") {
            bad_kind.push(note);
        } else if backend_part && (p.field.ends_with(".name") || p.field.ends_with(".port")) {
            not_found.push(note);
        } else {
            if let Some(i) = rule_index(&p.field) {
                dropped_rules.insert(i);
            }
            invalid.push(note);
        }
    }
    let all_dropped = !invalid.is_empty() && dropped_rules.len() >= route.spec.rules.len();
    let accepted = if all_dropped {
        RouteCondition { type_: "Accepted", status: false, reason: "UnsupportedValue", message: invalid.join("; ") }
    } else {
        RouteCondition { type_: "Accepted", status: true, reason: "Accepted", message: "Route was valid".into() }
    };
    let resolved = if !bad_kind.is_empty() {
        let mut m = bad_kind.clone();
        m.extend(not_found.iter().cloned());
        RouteCondition { type_: "ResolvedRefs", status: false, reason: "InvalidKind", message: m.join("; ") }
    } else if !not_found.is_empty() {
        RouteCondition {
            type_: "ResolvedRefs",
            status: false,
            reason: "BackendNotFound",
            message: not_found.join("; "),
        }
    } else {
        RouteCondition {
            type_: "ResolvedRefs",
            status: true,
            reason: "ResolvedRefs",
            message: "All references resolved".into(),
        }
    };
    let mut conditions = vec![accepted, resolved];
    if !invalid.is_empty() && !all_dropped {
        conditions.push(RouteCondition {
            type_: "PartiallyInvalid",
            status: true,
            reason: "UnsupportedValue",
            message: format!("rules left out: {}", invalid.join("; ")),
        });
    }
    mine.into_iter().map(|parent_ref| ParentStatus { parent_ref, conditions: conditions.clone() }).collect()
}

/// `spec.rules[3].…` → 3.
fn rule_index(field: &str) -> Option<usize> {
    field.strip_prefix("spec.rules[")?.split(']').next()?.parse().ok()
}

/// Writes `ours` into the route's `status.parents`, keeping other controllers' entries (and this
/// controller's entries for parents that are not in `ours`). Nothing is written when the stored status
/// already says the same, or when the stored route is gone or at another generation than
/// `route` (the next rebuild judges that one). True when a write happened.
pub async fn write_route_status(
    client: &kube::Client,
    route: &HTTPRoute,
    ours: &[ParentStatus],
) -> Result<bool, kube::Error> {
    let ar = ApiResource::erase::<HTTPRoute>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns_of(route), &ar);
    // One retry after a conflict; a second conflict waits for the next rebuild.
    for attempt in 0..2 {
        let Some(stored) = api.get_opt(name_of(route)).await? else {
            return Ok(false);
        };
        let generation = route.metadata.generation;
        if generation.is_some() && stored.metadata.generation != generation {
            return Ok(false);
        }
        let generation = stored.metadata.generation.unwrap_or(0);
        let existing: Vec<Value> =
            stored.data.pointer("/status/parents").and_then(Value::as_array).cloned().unwrap_or_default();
        let parents = merge(&existing, ours, generation, &now());
        if parents == existing {
            return Ok(false);
        }
        let patch = json!({
            "metadata": {"resourceVersion": stored.metadata.resource_version},
            "status": {"parents": parents},
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        match api.patch_status(name_of(route), &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 && attempt == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

fn now() -> String {
    serde_json::to_value(Time(Timestamp::now())).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The new `status.parents`: entries of others as they were, then ours; a condition whose status
/// did not change keeps its `lastTransitionTime`.
fn merge(existing: &[Value], ours: &[ParentStatus], generation: i64, now: &str) -> Vec<Value> {
    let is_ours = |e: &Value, p: &Value| {
        e.get("controllerName").and_then(Value::as_str) == Some(ROUTE_CONTROLLER_NAME) && e.get("parentRef") == Some(p)
    };
    let mut out: Vec<Value> =
        existing.iter().filter(|e| !ours.iter().any(|o| is_ours(e, &o.parent_ref))).cloned().collect();
    for o in ours {
        let before = existing.iter().find(|e| is_ours(e, &o.parent_ref));
        let conditions: Vec<Value> = o
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                let old = before
                    .and_then(|b| b.get("conditions"))
                    .and_then(Value::as_array)
                    .and_then(|cs| cs.iter().find(|x| x.get("type").and_then(Value::as_str) == Some(c.type_)));
                let since = old
                    .filter(|x| x.get("status").and_then(Value::as_str) == Some(status))
                    .and_then(|x| x.get("lastTransitionTime").cloned())
                    .unwrap_or_else(|| Value::from(now));
                json!({
                    "type": c.type_,
                    "status": status,
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": generation,
                    "lastTransitionTime": since,
                })
            })
            .collect();
        out.push(json!({"parentRef": o.parent_ref, "controllerName": ROUTE_CONTROLLER_NAME, "conditions": conditions}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(name: &str) -> Value {
        json!({"group": "", "kind": "Service", "name": name})
    }

    fn ok(name: &str) -> ParentStatus {
        ParentStatus {
            parent_ref: parent(name),
            conditions: vec![RouteCondition {
                type_: "Accepted",
                status: true,
                reason: "Accepted",
                message: "ok".into(),
            }],
        }
    }

    #[test]
    fn merge_keeps_other_controllers_and_transition_times() {
        let other = json!({"parentRef": parent("a"), "controllerName": "example.com/other", "conditions": []});
        let first = merge(std::slice::from_ref(&other), &[ok("a")], 1, "2026-01-01T00:00:00Z");
        assert_eq!(first.len(), 2);
        assert_eq!(first[0], other, "another controller's entry stays as it was");
        assert_eq!(first[1]["conditions"][0]["observedGeneration"], 1);
        // Same status at a later generation: the time stays, the generation moves.
        let second = merge(&first, &[ok("a")], 2, "2026-02-02T00:00:00Z");
        assert_eq!(second.len(), 2);
        assert_eq!(second[1]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(second[1]["conditions"][0]["observedGeneration"], 2);
        // Status flips: the time moves.
        let mut bad = ok("a");
        bad.conditions[0].status = false;
        let third = merge(&second, &[bad], 2, "2026-03-03T00:00:00Z");
        assert_eq!(third[1]["conditions"][0]["lastTransitionTime"], "2026-03-03T00:00:00Z");
        assert_eq!(third[1]["conditions"][0]["status"], "False");
        // Unchanged input gives an identical list (no write).
        assert_eq!(merge(&third, &[ok("a")], 2, "x"), merge(&third, &[ok("a")], 2, "x"));
    }

    #[test]
    fn rule_index_reads_the_field_path() {
        assert_eq!(rule_index("spec.rules[12].matches[0].path.value"), Some(12));
        assert_eq!(rule_index("spec.parentRefs[0]"), None);
    }
}
