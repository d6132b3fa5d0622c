//! What a write carries when a server forwards it to the leader: its request id (so a retried
//! forward takes effect once, `flotilla_storage::Command::Once`) and its original caller (so
//! the audit log names who asked, not the forwarding server). Both are taken from a request
//! only when a peer forwarded it (or security is off, where every caller is trusted alike):
//! a client cannot pose as someone else in the audit log or replay another request's answer.

use flotilla_security::{Identity, Role};
use flotilla_storage::audit::Caller;
use flotilla_storage::Command;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::Request;

use crate::{FORWARDED_HEADER, REQUEST_ID_HEADER};

/// The original caller's identity (`role/name`, or `anonymous`).
pub const CALLER_HEADER: &str = "x-flotilla-caller";
/// The original caller's address as the first server saw it.
pub const CALLER_ADDR_HEADER: &str = "x-flotilla-caller-addr";

/// The identity the role layer found on a call (None with security off).
pub(crate) fn identity_of<T>(request: &Request<T>) -> Option<Identity> {
    request.extensions().get::<flotilla_security::Caller>().and_then(|c| c.0.clone())
}

/// Whether a server forwarded `req` (it must not forward it again).
pub(crate) fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED_HEADER)
}

/// `msg` as a server forwards it to the leader: marked forwarded, bounded by `deadline`.
pub(crate) fn forward<T>(msg: T, deadline: Instant) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(FORWARDED_HEADER, MetadataValue::from_static("1"));
    req.set_timeout(deadline.saturating_duration_since(Instant::now()));
    req
}

/// [`forward`] for a write by `caller` with request id `id` (the same on every retry).
pub(crate) fn forward_write<T>(msg: T, id: u128, caller: &Caller, deadline: Instant) -> Request<T> {
    let mut req = forward(msg, deadline);
    let m = req.metadata_mut();
    m.insert(REQUEST_ID_HEADER, format!("{id:032x}").parse().expect("hex is a valid header value"));
    // Identities and socket addresses are ASCII; anything else is not forwarded (the leader
    // then records the forwarding server).
    if let (Ok(who), Ok(from)) = (caller.who.parse(), caller.from.parse()) {
        m.insert(CALLER_HEADER, who);
        m.insert(CALLER_ADDR_HEADER, from);
    }
    // the leader's `server.apply` continues the forwarding server's trace
    if let Some(tp) = flotilla_telemetry::propagation::traceparent(&tracing::Span::current()) {
        if let Ok(v) = tp.parse() {
            m.insert(flotilla_telemetry::propagation::TRACEPARENT, v);
        }
    }
    req
}

/// Whether `req` is a forward whose headers may be believed.
fn trusted_forward<T>(req: &Request<T>) -> bool {
    is_forwarded(req) && identity_of(req).is_none_or(|c| c.role == Role::Peer)
}

fn header<'a, T>(req: &'a Request<T>, name: &str) -> Option<&'a str> {
    req.metadata().get(name).and_then(|v| v.to_str().ok())
}

/// The id a write is applied under:
/// - the one a peer forwarded it with (made by the first server, below);
/// - where this server is the first to see the write and the client sent an id of its own
///   (the CLI does, the same on each of its retries), that id bound to the caller: the
///   first 128 bits of SHA-256 of the caller's identity and the id, so one caller cannot
///   reach another's answers by sending their ids;
/// - else a new random one.
pub(crate) fn request_id<T>(req: &Request<T>) -> u128 {
    let given = header(req, REQUEST_ID_HEADER).and_then(|v| u128::from_str_radix(v, 16).ok());
    match (given, trusted_forward(req)) {
        (Some(id), true) => id,
        (Some(id), false) => {
            use sha2::{Digest, Sha256};
            let who = identity_of(req).map_or_else(|| "anonymous".to_string(), |i| i.uri());
            let digest = Sha256::digest(format!("{who}\n{id:032x}").as_bytes());
            u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
        }
        (None, _) => uuid::Uuid::new_v4().as_u128(),
    }
}

/// Who made the write `req` (`method` on `target`), for the audit log.
pub(crate) fn caller<T>(req: &Request<T>, method: &str, target: String) -> Caller {
    let own = || {
        let who = identity_of(req).map_or_else(|| "anonymous".to_string(), |i| format!("{}/{}", i.role, i.name));
        let from = req.remote_addr().map_or_else(|| "unknown".to_string(), |a| a.to_string());
        (who, from)
    };
    let (who, from) = match (trusted_forward(req), header(req, CALLER_HEADER), header(req, CALLER_ADDR_HEADER)) {
        (true, Some(who), Some(from)) => (bounded(who), bounded(from)),
        _ => own(),
    };
    Caller { who, method: method.into(), target, from, at_ms: flotilla_api::civil::unix_ms() }
}

/// A header value cut to a sane length (a peer is trusted, but a log entry stays small).
fn bounded(s: &str) -> String {
    s.chars().take(256).collect()
}

/// `command`, applied once under `id` and recorded in the audit log as made by `caller`.
pub(crate) fn api_write(id: u128, caller: Caller, command: Command) -> Command {
    let audited = Command::Audited { caller, command: Box::new(command) };
    Command::Once { id, command: Box::new(audited) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_identity<T>(mut req: Request<T>, role: Role) -> Request<T> {
        req.extensions_mut().insert(flotilla_security::Caller(Some(Identity::new(role, "x").unwrap())));
        req
    }

    #[test]
    fn forward_headers_are_believed_only_from_a_peer() {
        let from_caller = Caller {
            who: "operator/olga".into(),
            method: "Apply".into(),
            target: "model/m".into(),
            from: "10.0.0.9:4000".into(),
            at_ms: 1,
        };
        let forwarded = || forward_write((), 0xabc, &from_caller, Instant::now());
        // security off, or a peer: the forward's id and caller
        for req in [forwarded(), with_identity(forwarded(), Role::Peer)] {
            assert_eq!(request_id(&req), 0xabc);
            let c = caller(&req, "Apply", "model/m".into());
            assert_eq!((c.who.as_str(), c.from.as_str()), ("operator/olga", "10.0.0.9:4000"));
        }
        // an admin sending the same headers: its own identity, and the id bound to it
        let req = with_identity(forwarded(), Role::Admin);
        assert_ne!(request_id(&req), 0xabc);
        assert_eq!(request_id(&req), request_id(&with_identity(forwarded(), Role::Admin)), "stable across retries");
        assert_ne!(request_id(&req), request_id(&with_identity(forwarded(), Role::Viewer)), "bound to the caller");
        assert_eq!(caller(&req, "Apply", "model/m".into()).who, "admin/x");
        // no forward at all
        let plain = Request::new(());
        assert_eq!(caller(&plain, "Delete", "model/m".into()).who, "anonymous");
    }
}
