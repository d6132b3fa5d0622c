//! The internal `RaftService`: receives Raft RPCs from peers and hands them to openraft.
use flotilla_api::pb::raft_service_server::RaftService;
use flotilla_api::pb::RaftPayload;
use flotilla_storage::Raft;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;

pub(crate) struct RaftServiceImpl {
    pub(crate) raft: Raft,
    pub(crate) metrics: Metrics,
}

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("cluster.bad_raft_payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    let data = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let timer = self.metrics.grpc_timer("raft.AppendEntries");
        let r = async { encode(&self.raft.append_entries(decode(req)?).await) }.await;
        timer.finish(r)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let timer = self.metrics.grpc_timer("raft.Vote");
        let r = async { encode(&self.raft.vote(decode(req)?).await) }.await;
        timer.finish(r)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let timer = self.metrics.grpc_timer("raft.InstallSnapshot");
        let r = async { encode(&self.raft.install_snapshot(decode(req)?).await) }.await;
        timer.finish(r)
    }
}
