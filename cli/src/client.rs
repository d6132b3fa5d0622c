//! A client of the flotilla gRPC API that tries each configured server in order, moving on
//! when one is unreachable or has no leader.
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::CliError;

pub(crate) struct Client {
    servers: Vec<String>,
    tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// A write carrying `id` (`x-flotilla-request-id`): the same on each of the client's
/// retries of one write, so a retry after a lost answer gets the first answer instead of
/// being applied again (a compare-and-set coming back as a conflict against itself). The
/// server binds the id to the caller.
pub(crate) fn write_request<T>(msg: T, id: u128) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value = format!("{id:032x}").parse().expect("hex is a valid header value");
    req.metadata_mut().insert(flotilla_cluster::REQUEST_ID_HEADER, value);
    req
}

/// A new id for one write ([`write_request`]).
pub(crate) fn new_request_id() -> u128 {
    rand::random()
}

/// A channel whose calls carry the CLI's bearer token, if it has one.
pub(crate) type AuthChannel = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer TOKEN` to every call (`--token`, `FLOTILLA_TOKEN`).
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How long one call to one server may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long to keep retrying while every server answers `cluster.no_leader` (an election
/// in progress, or a cluster just started): elections take well under a second, so this
/// rides one out without hiding a cluster that has lost its quorum for good. Safe for
/// writes: a server without a leader accepted nothing.
const ELECTION_WAIT: Duration = Duration::from_secs(5);

/// A follower's refusal of a method only the leader serves (`cluster.not_leader`, with the
/// leader's address as a hint); the object and cluster methods forward instead.
fn is_not_leader(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.message().starts_with("cluster.not_leader")
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl Client {
    pub(crate) fn new(
        servers: &str,
        tls: Option<std::sync::Arc<flotilla_security::Tls>>,
        token: Option<&str>,
    ) -> Result<Client, CliError> {
        let servers = servers.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        let token = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| CliError::usage("--token (FLOTILLA_TOKEN) is not printable ASCII"))
            })
            .transpose()?;
        Ok(Client { servers, tls, token })
    }

    async fn connect(&self, addr: &str) -> Result<AuthChannel, Status> {
        let endpoint = Endpoint::from_shared(url(&flotilla_api::dial::dial_address(addr)))
            .map_err(|_| Status::invalid_argument(format!("--server {addr:?} is not a host:port address")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT);
        let channel = flotilla_security::connect::connect(endpoint, self.tls.as_ref(), addr).await.map_err(|e| {
            let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
            Status::unavailable(format!("cannot reach server {addr}: {why}"))
        })?;
        Ok(InterceptedService::new(channel, Bearer(self.token.clone())))
    }

    /// Runs `f` against each server in turn until one gives an answer that is not
    /// "unavailable".
    pub(crate) async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        if self.servers.is_empty() {
            return Err(CliError::usage("--server is empty; give host:port of a flotilla server"));
        }
        let started = tokio::time::Instant::now();
        loop {
            let (mut last, mut no_leader) = (None, false);
            for addr in &self.servers {
                let result = match self.connect(addr).await {
                    Ok(channel) => f(channel).await,
                    Err(e) => Err(e),
                };
                match result {
                    Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled) => {
                        no_leader |= s.message().starts_with("cluster.no_leader");
                        last = Some(s)
                    }
                    // A leader-only method (node list, cordon, drain) asked of a follower:
                    // it did nothing, and the leader is another of the servers.
                    Err(s) if is_not_leader(&s) => last = Some(s),
                    other => return other.map_err(CliError::from),
                }
            }
            let last = last.expect("at least one server was tried");
            if !no_leader || started.elapsed() >= ELECTION_WAIT {
                return Err(CliError::from(last));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) async fn objects<T, F, Fut>(&self, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(ObjectServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.call(|ch| f(ObjectServiceClient::new(ch))).await
    }

    pub(crate) async fn cluster<T, F, Fut>(&self, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(ClusterServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.call(|ch| f(ClusterServiceClient::new(ch))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followers_not_leader_refusal_moves_on_and_a_conflict_does_not() {
        assert!(is_not_leader(&Status::failed_precondition("cluster.not_leader: leader=10.0.0.2:7070")));
        assert!(!is_not_leader(&Status::failed_precondition("cluster.conflict: revision 3, expected 2")));
        assert!(!is_not_leader(&Status::invalid_argument("cluster.not_leader: leader=x")));
    }
}
