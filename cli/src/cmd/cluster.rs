//! `cluster status|add-member|remove-member`.
use clap::Subcommand;
use flotilla_api::pb::{AddMemberRequest, RemoveMemberRequest, StatusRequest, StatusResponse};
use serde_json::json;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCommand {
    /// Members, leader, term, commit index and each member's applied index.
    Status,
    /// Add a server as a learner, wait until it has caught up, then promote it to voter.
    ///
    /// Example: flotilla cluster add-member 4 10.0.0.4:7070
    AddMember {
        /// The new member's --id.
        id: u64,
        /// The new member's gRPC address.
        addr: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member from the group.
    RemoveMember { id: u64 },
}

pub(crate) async fn run(client: &Client, cmd: ClusterCommand, format: Format) -> Result<(), CliError> {
    let status = match cmd {
        ClusterCommand::Status => {
            client.cluster(|mut c| async move { c.status(StatusRequest { local: false }).await }).await?.into_inner()
        }
        ClusterCommand::AddMember { id, addr, learner } => {
            let req = AddMemberRequest { id, addr, learner_only: learner };
            let r = client
                .cluster(|mut c| {
                    let req = req.clone();
                    async move { c.add_member(req).await }
                })
                .await?;
            r.into_inner().status.unwrap_or_default()
        }
        ClusterCommand::RemoveMember { id } => {
            let r = client.cluster(|mut c| async move { c.remove_member(RemoveMemberRequest { id }).await }).await?;
            r.into_inner().status.unwrap_or_default()
        }
    };
    print_status(&status, format);
    Ok(())
}

fn print_status(s: &StatusResponse, format: Format) {
    if format != Format::Table {
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| json!({"id": m.id, "addr": m.addr, "voter": m.voter, "leader": m.leader, "matched_index": m.matched_index, "applied_index": m.applied_index, "term": m.term, "reachable": m.reachable}))
            .collect();
        let doc = json!({"leader_id": s.leader_id, "term": s.term, "commit_index": s.commit_index, "store_revision": s.store_revision, "answered_by": s.answered_by, "snapshot_index": s.snapshot_index, "purged_index": s.purged_index, "members": members});
        output::print_doc(&doc, format);
        return;
    }
    let leader = if s.leader_id == 0 { "none".to_owned() } else { s.leader_id.to_string() };
    println!(
        "leader {leader}   term {}   commit index {}   store revision {}",
        s.term, s.commit_index, s.store_revision
    );
    let mut rows =
        vec![["ID", "ADDRESS", "ROLE", "REACHABLE", "TERM", "APPLIED", "MATCHED"].map(String::from).to_vec()];
    for m in &s.members {
        let role = if m.leader {
            "leader"
        } else if m.voter {
            "follower"
        } else {
            "learner"
        };
        let reachable = if m.reachable { "yes" } else { "no" };
        rows.push(vec![
            m.id.to_string(),
            m.addr.clone(),
            role.into(),
            reachable.into(),
            m.term.to_string(),
            m.applied_index.to_string(),
            m.matched_index.to_string(),
        ]);
    }
    output::print_table(&rows);
}
