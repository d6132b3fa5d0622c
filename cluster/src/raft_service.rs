//! The internal `RaftService`: receives Raft RPCs from peers and hands them to openraft. It
//! also notes when a leader was last heard from (an accepted AppendEntries or InstallSnapshot)
//! and, answering a vote request, starts this server's own campaign at once where
//! [`crate::campaign::should_campaign`] says so. InstallSnapshot chunks pass the
//! [`ChunkGuard`] first (bounded size, in sequence, checksum on the last one): a chunk beyond
//! the bound is INVALID_ARGUMENT; one out of sequence or ending a damaged snapshot is
//! answered with openraft's `SnapshotMismatch`, so a leader restarts the transfer.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::pb::raft_service_server::RaftService;
use flotilla_api::pb::RaftPayload;
use flotilla_storage::{Raft, TypeConfig};
use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
};
use openraft::SnapshotSegmentId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::campaign::{should_campaign, VoteSeen};
use crate::metrics::Metrics;
use crate::snapshot_chunks::{ChunkGuard, Refusal};

pub(crate) struct RaftServiceImpl {
    pub(crate) raft: Raft,
    pub(crate) metrics: Metrics,
    /// When this server last accepted entries or a snapshot from a leader.
    pub(crate) leader_contact: Arc<Mutex<Option<Instant>>>,
    /// Checks InstallSnapshot chunks before openraft sees them; held across the call, so
    /// chunks are handled one at a time (openraft serializes them anyway).
    pub(crate) chunks: tokio::sync::Mutex<ChunkGuard>,
}

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("cluster.bad_raft_payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    let data = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftPayload { data }))
}

impl RaftServiceImpl {
    fn heard_leader(&self) {
        *self.leader_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// openraft's own window for rejecting votes after hearing a leader: the maximum election
    /// timeout.
    fn vote_lease(&self) -> Duration {
        Duration::from_millis(self.raft.config().election_timeout_max)
    }

    fn since_leader(&self) -> Option<Duration> {
        self.leader_contact.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed())
    }

    /// Campaigns twice in a row: the first term collides with the rejected candidate's
    /// self-vote, the second is above it (openraft's trigger takes the next term of this
    /// server's own vote, which rejecting the candidate left unchanged).
    fn campaign(&self) {
        self.metrics.campaign_started();
        let raft = self.raft.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                if raft.trigger().elect().await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let timer = self.metrics.grpc_timer("raft.AppendEntries");
        let r = async {
            let req: AppendEntriesRequest<TypeConfig> = decode(req)?;
            let resp = self.raft.append_entries(req).await;
            if matches!(resp, Ok(ref r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                self.heard_leader();
            }
            encode(&resp)
        }
        .await;
        timer.finish(r)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let timer = self.metrics.grpc_timer("raft.Vote");
        let r = async {
            let req: VoteRequest<u64> = decode(req)?;
            let (our_term, follower) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.current_term, m.state == openraft::ServerState::Follower)
            };
            let (their_term, theirs) = (req.vote.leader_id().term, req.last_log_id);
            let resp = self.raft.vote(req).await;
            if let Ok(v) = &resp {
                let seen = VoteSeen {
                    granted: v.vote_granted,
                    follower,
                    our_term,
                    their_term,
                    ours: v.last_log_id.as_ref(),
                    theirs: theirs.as_ref(),
                    since_leader: self.since_leader(),
                };
                if should_campaign(&seen, self.vote_lease()) {
                    tracing::info!(candidate_log = ?theirs, our_log = ?v.last_log_id, "a candidate with a shorter log; campaigning at once");
                    self.campaign();
                }
            }
            encode(&resp)
        }
        .await;
        timer.finish(r)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let timer = self.metrics.grpc_timer("raft.InstallSnapshot");
        let r = async {
            let req: InstallSnapshotRequest<TypeConfig> = decode(req)?;
            let mut chunks = self.chunks.lock().await;
            if let Err(refusal) = chunks.admit(&req.meta.snapshot_id, req.offset, &req.data, req.done) {
                return refused(&req, refusal);
            }
            let resp = self.raft.install_snapshot(req).await;
            match resp {
                Ok(_) => self.heard_leader(),
                Err(_) => chunks.reset(),
            }
            encode(&resp)
        }
        .await;
        timer.finish(r)
    }
}

type SnapshotResult = Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;

/// The answer to a chunk the guard refused: INVALID_ARGUMENT beyond the bound; otherwise
/// openraft's `SnapshotMismatch`, on which a leader sends the snapshot again from `expect`.
fn refused(req: &InstallSnapshotRequest<TypeConfig>, refusal: Refusal) -> Result<Response<RaftPayload>, Status> {
    let id = &req.meta.snapshot_id;
    let expect = match refusal {
        Refusal::TooLarge { .. } => {
            tracing::warn!(snapshot = %id, offset = req.offset, len = req.data.len(), "{refusal}");
            return Err(Status::invalid_argument(refusal.to_string()));
        }
        Refusal::OutOfSequence { expect } => {
            tracing::info!(snapshot = %id, offset = req.offset, expect, "snapshot chunk out of sequence; refused");
            expect
        }
        Refusal::Corrupt(reason) => {
            tracing::warn!(snapshot = %id, %reason, "received snapshot is damaged; the leader must send it again");
            0
        }
    };
    let mismatch = SnapshotMismatch {
        expect: SnapshotSegmentId { id: id.clone(), offset: expect },
        got: SnapshotSegmentId { id: id.clone(), offset: req.offset },
    };
    let resp: SnapshotResult = Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch)));
    encode(&resp)
}
