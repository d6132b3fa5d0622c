//! openraft's network: Raft RPCs to peers over the internal gRPC `RaftService`, with
//! openraft's own request/response types as JSON payloads.
use flotilla_api::pb::raft_service_client::RaftServiceClient;
use flotilla_api::pb::RaftPayload;
use flotilla_storage::TypeConfig;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::Code;

use crate::peers::Peers;

/// Creates one [`PeerClient`] per replication target.
pub(crate) struct Network {
    pub(crate) peers: Peers,
}

pub(crate) struct PeerClient {
    target: u64,
    client: RaftServiceClient<Channel>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        let client = RaftServiceClient::new(self.peers.channel(&node.addr))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        PeerClient { target, client }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(&mut self, method: Method, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let response = match method {
            Method::Append => self.client.append_entries(request).await,
            Method::Vote => self.client.vote(request).await,
            Method::Snapshot => self.client.install_snapshot(request).await,
        };
        let payload = response.map_err(|status| match status.code() {
            Code::Unavailable | Code::Unknown => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<u64, E>> =
            serde_json::from_slice(&payload.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        self.call(Method::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(Method::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        self.call(Method::Vote, &rpc, &option).await
    }

    /// How long replication to an unreachable peer waits before each retry: 50 ms, doubling
    /// up to 250 ms (openraft's default is a constant 500 ms). A restarted server (a rolling
    /// upgrade) is thus caught up within ~50-250 ms of coming back instead of up to 500 ms
    /// later; a peer that stays down costs a refused or timed-out connect 4 times a second.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(unreachable_backoff())
    }
}

/// The retry delays behind [`PeerClient::backoff`].
fn unreachable_backoff() -> impl Iterator<Item = std::time::Duration> + Send + 'static {
    (0u32..).map(|i| std::time::Duration::from_millis((50u64 << i.min(3)).min(250)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_peer_is_retried_soon_then_every_quarter_second() {
        let ms: Vec<u128> = unreachable_backoff().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 250, 250, 250, 250]);
    }
}
