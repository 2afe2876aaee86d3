//! The tenant backend's hook settings (`Authorization: Bearer <api_key>`): show them, set or remove the pre-send
//! hook, rotate the signing secret. A hook URL is checked when it is set (its form, and the addresses it stands for
//! now) and again at every call, since what a name resolves to can change.
//!
//! A tenant only ever sees and changes its own hooks: every handler is scoped by the API key's tenant.

use super::{parse_body, tenant_of_request, ApiError};
use crate::outbound::OutboundError;
use crate::Gateway;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use switchyard_protocol::hooks::{FailurePolicy, HookUrl, PreSendHook, TenantHooks};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPreSend {
    url: String,
    timeout_ms: Option<u32>,
    on_failure: FailurePolicy,
}

/// The body of `PUT /v1/hooks/pre-send`, checked.
pub fn parse_set_pre_send(body: &[u8]) -> Result<PreSendHook, ApiError> {
    let request: SetPreSend = parse_body(body)?;
    let url = HookUrl::parse(&request.url).map_err(|e| ApiError::bad_request(e.to_string()))?;
    PreSendHook::new(url, request.timeout_ms, request.on_failure).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The hooks as the tenant's backend sees them (the signing secret included: it needs it to verify).
fn shown(hooks: Option<&TenantHooks>) -> Value {
    let pre_send = hooks
        .and_then(|hooks| hooks.pre_send.as_ref())
        .map(|hook| json!({"url": hook.url.as_str(), "timeout_ms": hook.timeout_ms, "on_failure": hook.on_failure}));
    json!({
        "signing_secret": hooks.map(|hooks| hooks.signing_secret.expose()),
        "pre_send": pre_send,
    })
}

pub async fn get_hooks(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    Ok(Json(shown(tenant.hooks.as_ref())))
}

pub async fn set_pre_send(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let hook = parse_set_pre_send(&body)?;
    match gw.outbound.check_reachable(hook.url.as_str()).await {
        Ok(()) => {}
        Err(OutboundError::Refused(why)) => {
            return Err(ApiError::bad_request(format!("url: {why}; the gateway's operator has not allowed it")))
        }
        Err(error) => return Err(ApiError::bad_request(format!("url: {error}"))),
    }
    let hooks = gw.tenants.set_pre_send(&tenant.project_id, Some(hook)).await?;
    Ok(Json(shown(hooks.as_ref())))
}

pub async fn remove_pre_send(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    gw.tenants.set_pre_send(&tenant.project_id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rotate_secret(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let secret = gw.tenants.rotate_signing_secret(&tenant.project_id).await?;
    Ok(Json(json!({"signing_secret": secret.expose()})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_send_body_is_checked() {
        let hook = parse_set_pre_send(br#"{"url":"https://example.com/h","on_failure":"deny"}"#).unwrap();
        assert_eq!((hook.timeout_ms, hook.on_failure), (1000, FailurePolicy::Deny));
        for bad in [
            &br#"{"url":"https://example.com/h"}"#[..],
            br#"{"url":"https://example.com/h","on_failure":"maybe"}"#,
            br#"{"url":"ftp://example.com/h","on_failure":"allow"}"#,
            br#"{"url":"https://example.com/h","on_failure":"allow","timeout_ms":10}"#,
            br#"{"url":"https://example.com/h","on_failure":"allow","extra":1}"#,
            br#"{"url":"https://a@example.com/h","on_failure":"allow"}"#,
            b"not json",
        ] {
            assert!(parse_set_pre_send(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
