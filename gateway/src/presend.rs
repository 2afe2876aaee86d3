//! The pre-send hook: before a client's `send`, `dm` or `edit` goes to its router shard, a tenant that configured a
//! hook has it asked (a signed POST) whether to allow, deny or modify it, within the hook's deadline; a timeout, a
//! failed call or an answer that is not a valid verdict applies the tenant's failure policy.
//!
//! Each tenant has at most `hooks_concurrency_per_tenant` calls in flight on a gateway: a call that finds none free
//! within its deadline fails (`busy`), so a hook that hangs ties up a bounded number of connections and never another
//! tenant's calls. Tenants without a hook pay one look-up in the tenant cache.
//!
//! This module does not sequence anything and does not call the hook for the backend's own messages
//! (`POST /v1/rooms/{room}/messages`).

use crate::outbound::{Answer, OutboundError};
use crate::Gateway;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchyard_protocol::hooks::{
    FailurePolicy, PreSendHook, PreSendOp, PreSendRequest, TenantHooks, Verdict, MAX_ANSWER_BYTES, PRE_SEND_TIMEOUT_MS,
    PRE_SEND_TYPE,
};
use switchyard_protocol::{ErrorCode, ProjectId, RoomId, UserId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The calls each tenant may have in flight. Entries exist only for tenants whose hook was called; the map is
/// emptied of idle entries when it reaches `MAX_TRACKED_TENANTS`.
pub struct HookSlots {
    per_tenant: usize,
    /// Never held across an await.
    tenants: Mutex<HashMap<ProjectId, Arc<Semaphore>>>,
}

/// Tenants whose slots are kept before idle ones are dropped.
const MAX_TRACKED_TENANTS: usize = 10_000;

impl HookSlots {
    pub fn new(per_tenant: usize) -> Self {
        HookSlots { per_tenant, tenants: Mutex::new(HashMap::new()) }
    }

    fn of(&self, tenant: &ProjectId) -> Arc<Semaphore> {
        let mut tenants = match self.tenants.lock() {
            Ok(tenants) => tenants,
            Err(poisoned) => poisoned.into_inner(),
        };
        if tenants.len() >= MAX_TRACKED_TENANTS && !tenants.contains_key(tenant) {
            // A semaphore with every permit free (and no other holder) is idle.
            tenants.retain(|_, slots| Arc::strong_count(slots) > 1 || slots.available_permits() < self.per_tenant);
        }
        tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant))).clone()
    }
}

/// A message about to be sent, as the hook sees it and may change it.
pub struct Draft {
    pub op: PreSendOp,
    pub room: RoomId,
    pub body: String,
    pub attrs: Option<Value>,
    pub reply_to: Option<u64>,
    /// The edited message, for `edit`.
    pub target: Option<u64>,
}

/// What becomes of a draft.
#[derive(Debug, PartialEq)]
pub enum Screened {
    /// Send it with this body and these attrs.
    Proceed { body: String, attrs: Option<Value> },
    /// Answer the client with this error.
    Refuse { code: ErrorCode, message: String },
}

/// Ask the tenant's pre-send hook about `draft`, or let it through at once when the tenant has none.
pub async fn screen(gw: &Gateway, tenant: &ProjectId, user: &UserId, draft: Draft) -> Screened {
    let hooks = match gw.tenants.lookup(tenant).await {
        Ok(Some(entry)) => entry.record.hooks.clone(),
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%tenant, %error, "cannot read the tenant's hooks");
            let message = "the tenant's settings cannot be read; retry".to_owned();
            return Screened::Refuse { code: ErrorCode::Unavailable, message };
        }
    };
    let Some((hook, hooks)) = hooks.and_then(|hooks| hooks.pre_send.clone().map(|hook| (hook, hooks))) else {
        return Screened::Proceed { body: draft.body, attrs: draft.attrs };
    };
    let started = Instant::now();
    let request = PreSendRequest {
        kind: PRE_SEND_TYPE,
        project_id: tenant,
        op: draft.op,
        room: &draft.room,
        user,
        body: &draft.body,
        attrs: draft.attrs.as_ref(),
        reply_to: draft.reply_to,
        seq: draft.target,
    };
    // A stored record is read as stored: its deadline is held to the bounds the API takes.
    let timeout_ms = hook.timeout_ms.clamp(*PRE_SEND_TIMEOUT_MS.start(), *PRE_SEND_TIMEOUT_MS.end());
    let deadline = Duration::from_millis(u64::from(timeout_ms));
    let slots = gw.hook_slots.of(tenant);
    let answer = match (tokio::time::timeout(deadline, slots.acquire_owned()).await, serde_json::to_vec(&request)) {
        (Ok(Ok(slot)), Ok(payload)) => {
            let left = deadline.saturating_sub(started.elapsed());
            call(gw, &hook, &hooks, payload, left, slot).await
        }
        (Err(_) | Ok(Err(_)), _) => Err(OutboundError::Busy),
        (_, Err(error)) => Err(OutboundError::Failed(error.to_string())),
    };
    let (screened, outcome) = decide(&hook, answer, draft, gw.config.max_body_bytes, gw.config.max_attrs_bytes);
    metrics::histogram!("switchyard_gateway_presend_hook_duration_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    screened
}

/// One signed call of the hook.
async fn call(
    gw: &Gateway,
    hook: &PreSendHook,
    hooks: &TenantHooks,
    payload: Vec<u8>,
    deadline: Duration,
    slot: OwnedSemaphorePermit,
) -> Result<Answer, OutboundError> {
    let id = format!("msg_{}", ulid::Ulid::new());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let timestamp = now.as_secs();
    let signature = hooks.signature(&id, timestamp, &payload, now.as_millis() as u64);
    let headers = [("webhook-id", id), ("webhook-timestamp", timestamp.to_string()), ("webhook-signature", signature)];
    gw.outbound.post_json(hook.url.as_str(), &headers, payload, deadline, MAX_ANSWER_BYTES, slot).await
}

/// What a hook's answer (or its failure) does to the draft, and the outcome's label for the metrics.
fn decide(
    hook: &PreSendHook,
    answer: Result<Answer, OutboundError>,
    draft: Draft,
    max_body_bytes: usize,
    max_attrs_bytes: usize,
) -> (Screened, &'static str) {
    let failed = |draft: Draft, why: String, outcome: &'static str| {
        let hook_url = hook.url.as_str().split(['?', '#']).next().unwrap_or_default();
        tracing::debug!(hook = hook_url, %why, "the pre-send hook failed; its failure policy applies");
        let screened = match hook.on_failure {
            FailurePolicy::Allow => Screened::Proceed { body: draft.body, attrs: draft.attrs },
            FailurePolicy::Deny => Screened::Refuse {
                code: ErrorCode::Unavailable,
                message: "the application's pre-send check did not answer; retry".to_owned(),
            },
        };
        (screened, outcome)
    };
    let answer = match answer {
        Ok(answer) if (200..300).contains(&answer.status) => answer,
        Ok(answer) => return failed(draft, format!("status {}", answer.status), "error_status"),
        Err(OutboundError::Timeout(after)) => return failed(draft, format!("no answer within {after:?}"), "timeout"),
        Err(OutboundError::Refused(why)) => return failed(draft, why, "refused_address"),
        Err(OutboundError::Busy) => return failed(draft, "every slot of the tenant is taken".into(), "busy"),
        Err(error) => return failed(draft, error.to_string(), "error"),
    };
    match Verdict::parse(&answer.body, draft.op, max_body_bytes, max_attrs_bytes) {
        Ok(Verdict::Allow) => (Screened::Proceed { body: draft.body, attrs: draft.attrs }, "allow"),
        Ok(Verdict::Deny { code, message }) => (Screened::Refuse { code, message }, "deny"),
        Ok(Verdict::Modify { body, attrs }) => {
            // An edit has no attrs; a modify that names none keeps the sender's, and `null` removes them.
            let attrs = match (draft.op, attrs) {
                (PreSendOp::Edit, _) => None,
                (_, None) => draft.attrs,
                (_, Some(replaced)) => replaced,
            };
            (Screened::Proceed { body, attrs }, "modify")
        }
        Err(error) => failed(draft, error.to_string(), "bad_answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use switchyard_protocol::hooks::HookUrl;

    fn hook(on_failure: FailurePolicy) -> PreSendHook {
        PreSendHook::new(HookUrl::parse("https://example.com/").unwrap(), None, on_failure).unwrap()
    }

    fn draft(op: PreSendOp) -> Draft {
        Draft {
            op,
            room: RoomId::parse("general").unwrap(),
            body: "hi".into(),
            attrs: Some(serde_json::json!({"k": 1})),
            reply_to: None,
            target: None,
        }
    }

    fn answer(status: u16, body: &str) -> Result<Answer, OutboundError> {
        Ok(Answer { status, body: Bytes::from(body.to_owned()) })
    }

    #[test]
    fn verdicts_allow_deny_and_modify() {
        let h = hook(FailurePolicy::Deny);
        let (s, o) = decide(&h, answer(200, r#"{"action":"allow"}"#), draft(PreSendOp::Send), 100, 100);
        assert_eq!(
            (s, o),
            (Screened::Proceed { body: "hi".into(), attrs: Some(serde_json::json!({"k": 1})) }, "allow")
        );
        let (s, _) = decide(&h, answer(200, r#"{"action":"deny","message":"no"}"#), draft(PreSendOp::Dm), 100, 100);
        assert_eq!(s, Screened::Refuse { code: ErrorCode::Forbidden, message: "no".into() });
        let (s, _) = decide(&h, answer(200, r#"{"action":"modify","body":"HI"}"#), draft(PreSendOp::Send), 100, 100);
        assert_eq!(s, Screened::Proceed { body: "HI".into(), attrs: Some(serde_json::json!({"k": 1})) });
        let (s, _) = decide(&h, answer(200, r#"{"action":"modify","body":"HI"}"#), draft(PreSendOp::Edit), 100, 100);
        assert_eq!(s, Screened::Proceed { body: "HI".into(), attrs: None });
        let removed = answer(200, r#"{"action":"modify","body":"HI","attrs":null}"#);
        let (s, _) = decide(&h, removed, draft(PreSendOp::Send), 100, 100);
        assert_eq!(s, Screened::Proceed { body: "HI".into(), attrs: None });
        let replaced = answer(200, r#"{"action":"modify","body":"HI","attrs":{"z":2}}"#);
        let (s, _) = decide(&h, replaced, draft(PreSendOp::Send), 100, 100);
        assert_eq!(s, Screened::Proceed { body: "HI".into(), attrs: Some(serde_json::json!({"z": 2})) });
    }

    #[test]
    fn failures_follow_the_policy() {
        type Failure = fn() -> Result<Answer, OutboundError>;
        let failures: [(Failure, &str); 5] = [
            (|| answer(500, r#"{"action":"allow"}"#), "error_status"),
            (|| answer(302, ""), "error_status"),
            (|| answer(200, "not json"), "bad_answer"),
            (|| Err(OutboundError::Timeout(Duration::from_millis(5))), "timeout"),
            (|| Err(OutboundError::Refused("127.0.0.1 is a loopback address".into())), "refused_address"),
        ];
        for (failure, label) in failures {
            let (s, o) = decide(&hook(FailurePolicy::Allow), failure(), draft(PreSendOp::Send), 100, 100);
            assert_eq!(o, label);
            assert_eq!(s, Screened::Proceed { body: "hi".into(), attrs: Some(serde_json::json!({"k": 1})) });
            let (s, o) = decide(&hook(FailurePolicy::Deny), failure(), draft(PreSendOp::Send), 100, 100);
            assert_eq!(o, label);
            assert!(matches!(s, Screened::Refuse { code: ErrorCode::Unavailable, .. }), "{s:?}");
        }
        let (s, _) = decide(
            &hook(FailurePolicy::Deny),
            answer(200, r#"{"action":"modify","body":"far too long"}"#),
            draft(PreSendOp::Send),
            5,
            100,
        );
        assert!(matches!(s, Screened::Refuse { code: ErrorCode::Unavailable, .. }));
    }
}
