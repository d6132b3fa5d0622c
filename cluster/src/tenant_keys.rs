//! The `TenantKeyService`: keys for tenants, made here. A key is `ftk_<id>_<secret>` with 64
//! random bits of id and 256 of secret from the OS; the tenant keeps the id, the SHA-256 of
//! the key and when it was made (`flotilla_api::spec::TenantKey`), and the key itself is
//! answered once. SHA-256 rather than a slow or keyed hash: a 256-bit random secret cannot be
//! guessed from its hash, and gateways check a key on every request (docs/security.md).
//!
//! Both calls are a read-modify-write of the Tenant through the object service, as the
//! caller (role checks, audit log), pinned to the revision read and retried on a conflict.
use flotilla_api::pb::tenant_key_service_server::TenantKeyService;
use flotilla_api::pb::{
    ApplyRequest, CreateTenantKeyRequest, CreateTenantKeyResponse, GetRequest, RevokeTenantKeyRequest,
    RevokeTenantKeyResponse,
};
use flotilla_api::spec::{hash_api_key, TenantKey, TenantSpec, TENANT_KEY_PREFIX};
use tonic::{Code, Request, Response, Status};

use crate::object_service::ObjectServiceImpl;

pub(crate) struct TenantKeyServiceImpl {
    pub(crate) objects: ObjectServiceImpl,
}

/// Read-modify-write attempts before giving up on a tenant that keeps changing.
const ATTEMPTS: usize = 5;

/// A new key and what the tenant keeps of it.
pub(crate) fn new_key(now: u64) -> (String, TenantKey) {
    let (id, secret) = (flotilla_api::hex(&rand::random::<[u8; 8]>()), flotilla_api::hex(&rand::random::<[u8; 32]>()));
    let key = format!("{TENANT_KEY_PREFIX}{id}_{secret}");
    let kept = TenantKey { id, hash: hash_api_key(&key), created_at: now };
    (key, kept)
}

/// A request carrying `from`'s identity and connection (for the role checks and the audit).
fn as_caller<T, U>(from: &Request<U>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    *r.extensions_mut() = from.extensions().clone();
    r
}

impl TenantKeyServiceImpl {
    /// Applies `change` to tenant `name`'s spec and writes it back pinned to the revision
    /// read; the tenant's revision after the write and what `change` returned.
    async fn modify<U, R>(
        &self,
        from: &Request<U>,
        name: &str,
        mut change: impl FnMut(&mut TenantSpec) -> Result<R, Status>,
    ) -> Result<(u64, R), Status> {
        for _ in 0..ATTEMPTS {
            let get = GetRequest { kind: "Tenant".into(), name: name.into(), stale: false };
            let object = self.objects.get_inner(as_caller(from, get)).await?.into_inner().object;
            let object =
                object.ok_or_else(|| Status::not_found(format!("cluster.not_found: Tenant/{name} not found")))?;
            let mut spec: TenantSpec = serde_json::from_str(&object.spec_json)
                .map_err(|e| Status::internal(format!("cluster.internal: stored Tenant/{name}: {e}")))?;
            let out = change(&mut spec)?;
            let manifest = serde_json::json!({
                "kind": "Tenant",
                "metadata": {"name": name, "labels": object.labels},
                "spec": spec,
            })
            .to_string();
            let apply = ApplyRequest { manifest, expected_revision: Some(object.revision) };
            match self.objects.apply_inner(as_caller(from, apply)).await {
                Ok(r) => return Ok((r.into_inner().object.map_or(0, |o| o.revision), out)),
                Err(s) if s.code() == Code::FailedPrecondition && s.message().starts_with("cluster.conflict") => {
                    continue
                }
                Err(s) => return Err(s),
            }
        }
        Err(Status::aborted(format!(
            "cluster.conflict: Tenant/{name} changed {ATTEMPTS} times while its keys were being changed; try again"
        )))
    }
}

#[tonic::async_trait]
impl TenantKeyService for TenantKeyServiceImpl {
    async fn create_key(
        &self,
        request: Request<CreateTenantKeyRequest>,
    ) -> Result<Response<CreateTenantKeyResponse>, Status> {
        let timer = self.objects.node.metrics.grpc_timer("CreateKey");
        let name = request.get_ref().tenant.clone();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let r = self
            .modify(&request, &name, |spec| {
                let (key, kept) = new_key(now);
                let id = kept.id.clone();
                spec.keys.push(kept);
                Ok((key, id))
            })
            .await
            .map(|(revision, (key, id))| Response::new(CreateTenantKeyResponse { key, id, revision }));
        if r.is_ok() {
            tracing::info!(tenant = %name, "tenant key created");
        }
        timer.finish(r)
    }

    async fn revoke_key(
        &self,
        request: Request<RevokeTenantKeyRequest>,
    ) -> Result<Response<RevokeTenantKeyResponse>, Status> {
        let timer = self.objects.node.metrics.grpc_timer("RevokeKey");
        let (name, id) = (request.get_ref().tenant.clone(), request.get_ref().id.clone());
        let r = self
            .modify(&request, &name, |spec| {
                let before = spec.keys.len();
                spec.keys.retain(|k| k.id != id);
                if spec.keys.len() == before {
                    return Err(Status::not_found(format!("cluster.not_found: Tenant/{name} has no key {id}")));
                }
                Ok(())
            })
            .await
            .map(|(revision, ())| Response::new(RevokeTenantKeyResponse { revision }));
        timer.finish(r)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_random_and_kept_as_their_hash() {
        let (a, kept) = super::new_key(7);
        let (b, _) = super::new_key(7);
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("ftk_{}_", kept.id)) && a.len() == 4 + 16 + 1 + 64, "{a}");
        assert_eq!(kept.hash, flotilla_api::spec::hash_api_key(&a));
        assert!(!kept.hash.contains(&a[21..]));
        let spec = flotilla_api::spec::TenantSpec {
            rpm: 0,
            tpm: 0,
            priority: Default::default(),
            models: vec![],
            api_keys: vec![],
            keys: vec![kept],
            max_concurrent_requests: None,
        };
        assert!(spec.validate().is_ok());
    }
}
