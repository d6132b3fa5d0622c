//! The `ClusterService`: status of the Raft group as seen from every member, and membership
//! changes (add as learner, catch up, promote; remove), run on the leader.
use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::cluster_service_server::ClusterService;
use flotilla_api::pb::{
    AddMemberRequest, AddMemberResponse, AuditEntry, AuditRequest, AuditResponse, Event, EventsRequest, EventsResponse,
    Member, RemoveMemberRequest, RemoveMemberResponse, SnapshotChunk, SnapshotRequest, StatusRequest, StatusResponse,
};
use flotilla_storage::audit::Caller;
use flotilla_storage::Command;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::forwarded;
use crate::node::{commit_index, Node, Route};
use crate::ClusterError;

pub(crate) struct ClusterServiceImpl {
    pub(crate) node: Node,
}

/// How long a membership change may take (a new member may need a snapshot first).
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `Status` waits for each member's own answer.
const MEMBER_STATUS_TIMEOUT: Duration = Duration::from_millis(800);
/// Audit entries per answer: by default, and at most.
const AUDIT_DEFAULT_LIMIT: usize = 100;
/// Largest chunk of a `Snapshot` stream (below gRPC's 4 MiB default message limit).
const SNAPSHOT_CHUNK: usize = 1 << 20;

impl ClusterServiceImpl {
    /// This server's own view of the group.
    fn local_status(&self) -> StatusResponse {
        let m = self.node.raft_metrics();
        let replication = m.replication.clone().unwrap_or_default();
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
                matched_index: replication.get(id).copied().flatten().map_or(0, |l| l.index),
                applied_index: if *id == m.id { m.last_applied.map_or(0, |l| l.index) } else { 0 },
                term: if *id == m.id { m.current_term } else { 0 },
                reachable: *id == m.id,
            })
            .collect();
        StatusResponse {
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            commit_index: commit_index(&m).unwrap_or(0),
            members,
            store_revision: self.node.reader.revision(),
            answered_by: m.id,
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
        }
    }

    async fn ask_member(&self, addr: String) -> Option<StatusResponse> {
        let mut client = ClusterServiceClient::new(self.node.peers.channel(&addr));
        let mut req = Request::new(StatusRequest { local: true });
        req.set_timeout(MEMBER_STATUS_TIMEOUT);
        let r = tokio::time::timeout(MEMBER_STATUS_TIMEOUT, client.status(req)).await;
        r.ok()?.ok().map(Response::into_inner)
    }

    /// The group's status: this server's view, completed by each member's own answer.
    async fn full_status(&self) -> StatusResponse {
        let mut status = self.local_status();
        let others: Vec<_> = status.members.iter().filter(|m| m.id != self.node.id).map(|m| m.addr.clone()).collect();
        let answers = futures::future::join_all(others.into_iter().map(|a| self.ask_member(a))).await;
        for answer in answers.into_iter().flatten() {
            if answer.answered_by == status.leader_id && status.leader_id != self.node.id {
                status.commit_index = answer.commit_index;
                for (mine, theirs) in status.members.iter_mut().zip(&answer.members) {
                    if mine.id == theirs.id {
                        mine.matched_index = theirs.matched_index;
                    }
                }
            }
            if let Some(m) = status.members.iter_mut().find(|m| m.id == answer.answered_by) {
                let own = answer.members.iter().find(|x| x.id == answer.answered_by);
                m.applied_index = own.map_or(0, |x| x.applied_index);
                m.term = answer.term;
                m.reachable = true;
            }
        }
        status
    }

    /// Records a membership change made on this server (the leader) in the audit log. The
    /// change itself is done: a failure here is logged, not answered.
    async fn audit_membership(&self, id: u128, by: Caller) {
        let record = forwarded::api_write(id, by, Command::Txn { compares: vec![], ops: vec![] });
        match self.node.propose(record, self.node.deadline()).await {
            Ok(Route::Done(_)) => {}
            Ok(Route::Leader(_)) => tracing::warn!("membership change not audited: leadership moved"),
            Err(e) => tracing::warn!(error = %e, "membership change not audited"),
        }
    }

    /// Runs a membership change on the leader, or forwards the request to it.
    async fn on_leader<T, F, Fut>(&self, local: F, forward: impl AsyncForward<T>) -> Result<T, Status>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        let m = self.node.raft_metrics();
        match m.current_leader {
            Some(id) if id == self.node.id => local().await,
            Some(id) => {
                let addr = m
                    .membership_config
                    .nodes()
                    .find(|(i, _)| **i == id)
                    .map(|(_, n)| n.addr.clone())
                    .ok_or(ClusterError::NoLeader)?;
                forward.call(ClusterServiceClient::new(self.node.peers.channel(&addr)), deadline).await
            }
            None => Err(ClusterError::NoLeader.into()),
        }
    }
}

/// A forwarded call to the leader's `ClusterService`.
trait AsyncForward<T> {
    async fn call(
        self,
        client: ClusterServiceClient<tonic::transport::Channel>,
        deadline: Instant,
    ) -> Result<T, Status>;
}

/// A forwarded membership change with its request id and caller.
struct ForwardAdd(AddMemberRequest, u128, Caller);
struct ForwardRemove(RemoveMemberRequest, u128, Caller);

impl AsyncForward<AddMemberResponse> for ForwardAdd {
    async fn call(
        self,
        mut c: ClusterServiceClient<tonic::transport::Channel>,
        d: Instant,
    ) -> Result<AddMemberResponse, Status> {
        c.add_member(forwarded::forward_write(self.0, self.1, &self.2, d)).await.map(Response::into_inner)
    }
}

impl AsyncForward<RemoveMemberResponse> for ForwardRemove {
    async fn call(
        self,
        mut c: ClusterServiceClient<tonic::transport::Channel>,
        d: Instant,
    ) -> Result<RemoveMemberResponse, Status> {
        c.remove_member(forwarded::forward_write(self.0, self.1, &self.2, d)).await.map(Response::into_inner)
    }
}

fn raft_err(e: impl std::fmt::Display) -> Status {
    ClusterError::Raft(e.to_string()).into()
}

type MembershipResult = Result<
    openraft::raft::ClientWriteResponse<flotilla_storage::TypeConfig>,
    RaftError<u64, ClientWriteError<u64, BasicNode>>,
>;

/// Runs a membership change, retrying while an earlier change (a join racing this one, or
/// the second phase of a joint consensus) is still being committed: openraft allows one at
/// a time and answers "already undergoing a configuration change" meanwhile.
async fn retry_in_progress<F, Fut>(deadline: Instant, mut change: F) -> Result<(), Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = MembershipResult>,
{
    loop {
        match tokio::time::timeout_at(deadline, change()).await {
            Err(_) => return Err(ClusterError::Timeout(MEMBERSHIP_TIMEOUT).into()),
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(p),
            )))) if Instant::now() + IN_PROGRESS_RETRY < deadline => {
                tracing::debug!(in_progress = %p, "membership change in progress; retrying");
                tokio::time::sleep(IN_PROGRESS_RETRY).await;
            }
            Ok(Err(e)) => return Err(raft_err(e)),
        }
    }
}

/// Pause between tries while another membership change commits.
const IN_PROGRESS_RETRY: Duration = Duration::from_millis(50);

#[tonic::async_trait]
impl ClusterService for ClusterServiceImpl {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("Status");
        let status = if request.get_ref().local { self.local_status() } else { self.full_status().await };
        timer.finish(Ok(Response::new(status)))
    }

    async fn add_member(&self, request: Request<AddMemberRequest>) -> Result<Response<AddMemberResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("AddMember");
        let audit_id = forwarded::request_id(&request);
        let by = forwarded::caller(&request, "AddMember", format!("member/{}", request.get_ref().id));
        let req = request.into_inner();
        let r = async {
            if req.id == 0 {
                return Err(ClusterError::InvalidArgument("member id must be a positive integer".into()).into());
            }
            if req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':') {
                return Err(
                    ClusterError::InvalidArgument(format!("member address {:?} is not host:port", req.addr)).into()
                );
            }
            let (id, addr, learner_only) = (req.id, req.addr.clone(), req.learner_only);
            let by2 = by.clone();
            self.on_leader(
                || async move {
                    tracing::info!(member = id, %addr, "adding member as learner");
                    let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
                    let node = BasicNode::new(addr);
                    retry_in_progress(deadline, || self.node.raft.add_learner(id, node.clone(), true)).await?;
                    if !learner_only {
                        tracing::info!(member = id, "promoting member to voter");
                        retry_in_progress(deadline, || {
                            self.node.raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                        })
                        .await?;
                    }
                    self.audit_membership(audit_id, by2).await;
                    Ok(AddMemberResponse { status: Some(self.local_status()) })
                },
                ForwardAdd(req, audit_id, by),
            )
            .await
        }
        .await;
        timer.finish(r.map(Response::new))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("RemoveMember");
        let audit_id = forwarded::request_id(&request);
        let by = forwarded::caller(&request, "RemoveMember", format!("member/{}", request.get_ref().id));
        let req = request.into_inner();
        let by2 = by.clone();
        let id = req.id;
        let r = self
            .on_leader(
                || async move {
                    let m = self.node.raft_metrics();
                    let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
                    let change = if voters.contains(&id) {
                        if voters.len() == 1 {
                            return Err(ClusterError::InvalidArgument(format!(
                                "member {id} is the only voter; a cluster cannot remove its last voter"
                            ))
                            .into());
                        }
                        ChangeMembers::RemoveVoters([id].into())
                    } else if m.membership_config.nodes().any(|(i, _)| *i == id) {
                        ChangeMembers::RemoveNodes([id].into())
                    } else {
                        return Err(ClusterError::InvalidArgument(format!("member {id} is not in the cluster")).into());
                    };
                    tracing::info!(member = id, "removing member");
                    let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
                    retry_in_progress(deadline, || self.node.raft.change_membership(change.clone(), false)).await?;
                    self.audit_membership(audit_id, by2).await;
                    Ok(RemoveMemberResponse { status: Some(self.local_status()) })
                },
                ForwardRemove(req, audit_id, by),
            )
            .await;
        timer.finish(r.map(Response::new))
    }

    async fn audit(&self, request: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("Audit");
        let req = request.into_inner();
        let limit = match req.limit as usize {
            0 => AUDIT_DEFAULT_LIMIT,
            n => n.min(flotilla_storage::audit::KEPT),
        };
        let (entries, oldest_revision, store_revision) = self.node.reader.audit(req.since_revision, &req.who, limit);
        let entries = entries
            .into_iter()
            .map(|e| AuditEntry {
                revision: e.revision,
                who: e.caller.who,
                method: e.caller.method,
                target: e.caller.target,
                from: e.caller.from,
                at_ms: e.caller.at_ms,
                result: e.result,
            })
            .collect();
        timer.finish(Ok(Response::new(AuditResponse {
            entries,
            oldest_revision,
            store_revision,
            answered_by: self.node.id,
        })))
    }

    type SnapshotStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<SnapshotChunk, Status>> + Send + 'static>>;

    /// This server's whole state at one store revision, in 1 MiB chunks (admin only: it
    /// holds every secret the store does).
    async fn snapshot(&self, _request: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let timer = self.node.metrics.grpc_timer("Snapshot");
        let (data, revision) =
            self.node.reader.export().map_err(|e| Status::internal(format!("cannot serialize the state: {e}")))?;
        let (total_bytes, sha256, answered_by) =
            (data.len() as u64, flotilla_storage::backup::sha256(&data), self.node.id);
        let chunks: Vec<Result<SnapshotChunk, Status>> = data
            .chunks(SNAPSHOT_CHUNK)
            .enumerate()
            .map(|(i, c)| {
                let first = i == 0;
                Ok(SnapshotChunk {
                    data: c.to_vec(),
                    revision: if first { revision } else { 0 },
                    total_bytes: if first { total_bytes } else { 0 },
                    sha256: if first { sha256.clone() } else { String::new() },
                    answered_by: if first { answered_by } else { 0 },
                })
            })
            .collect();
        timer.finish(Ok(Response::new(Box::pin(futures::stream::iter(chunks)) as Self::SnapshotStream)))
    }

    /// The event log as this server's state machine holds it (a follower may lag).
    async fn events(&self, request: Request<EventsRequest>) -> Result<Response<EventsResponse>, Status> {
        let timer = self.node.metrics.grpc_timer("Events");
        let req = request.into_inner();
        let limit = match req.limit as usize {
            0 => AUDIT_DEFAULT_LIMIT,
            n => n.min(flotilla_storage::eventlog::KEPT),
        };
        let (events, oldest_revision, store_revision) = self.node.reader.events(req.since_revision, &req.object, limit);
        let events = events
            .into_iter()
            .map(|e| Event {
                revision: e.revision,
                object: e.note.object,
                reason: e.note.reason,
                message: e.note.message,
                by: e.note.by,
                at_ms: e.note.at_ms,
            })
            .collect();
        timer.finish(Ok(Response::new(EventsResponse {
            events,
            oldest_revision,
            store_revision,
            answered_by: self.node.id,
        })))
    }
}
