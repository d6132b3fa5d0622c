//! `node list|cordon|uncordon|drain`: operator view and control of the machines.
use clap::Subcommand;
use flotilla_api::pb::fleet_service_client::FleetServiceClient;
use flotilla_api::pb::{ListNodesRequest, NodeAction, NodeActionRequest, NodeInfo};
use flotilla_api::ObjectName;
use serde_json::json;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum NodeCommand {
    /// Nodes with their state, GPUs (free/total), replicas and heartbeat age.
    List,
    /// Place no new replicas on the node; running ones stay.
    ///
    /// Example: flotilla node cordon gpu-07
    Cordon { name: String },
    /// Make the node schedulable again (also ends a drain).
    Uncordon { name: String },
    /// Cordon the node and move every replica elsewhere.
    Drain { name: String },
}

pub(crate) async fn run(client: &Client, cmd: NodeCommand, format: Format) -> Result<(), CliError> {
    let (name, action) = match cmd {
        NodeCommand::List => {
            let nodes = client
                .call(|ch| async move { FleetServiceClient::new(ch).list_nodes(ListNodesRequest {}).await })
                .await?
                .into_inner()
                .nodes;
            print_nodes(&nodes, format);
            return Ok(());
        }
        NodeCommand::Cordon { name } => (name, NodeAction::Cordon),
        NodeCommand::Uncordon { name } => (name, NodeAction::Uncordon),
        NodeCommand::Drain { name } => (name, NodeAction::Drain),
    };
    let name: ObjectName = name.parse()?;
    let req = NodeActionRequest { name: name.to_string(), action: action as i32 };
    let node = client
        .call(|ch| {
            let req = req.clone();
            async move { FleetServiceClient::new(ch).set_node(req).await }
        })
        .await?
        .into_inner()
        .node
        .unwrap_or_default();
    match format {
        Format::Table => println!("node/{} {}", node.name, node.state),
        _ => print_nodes(&[node], format),
    }
    Ok(())
}

fn print_nodes(nodes: &[NodeInfo], format: Format) {
    if format != Format::Table {
        let docs: Vec<_> = nodes
            .iter()
            .map(|n| {
                json!({"name": n.name, "address": n.address, "state": n.state, "reason": n.reason,
                       "gpus_total": n.gpus_total, "gpus_free": n.gpus_free, "gpu_types": n.gpu_types,
                       "replicas": n.replicas, "heartbeat_age_ms": n.heartbeat_age_ms, "labels": n.labels})
            })
            .collect();
        output::print_doc(&serde_json::Value::Array(docs), format);
        return;
    }
    let mut rows = vec![["NAME", "STATE", "GPUS(FREE/TOTAL)", "TYPES", "REPLICAS", "HEARTBEAT", "REASON"]
        .map(String::from)
        .to_vec()];
    for n in nodes {
        let age = if n.heartbeat_age_ms == 0 {
            "-".into()
        } else {
            format!("{:.1}s ago", n.heartbeat_age_ms as f64 / 1000.0)
        };
        rows.push(vec![
            n.name.clone(),
            n.state.clone(),
            format!("{}/{}", n.gpus_free, n.gpus_total),
            n.gpu_types.join(","),
            n.replicas.len().to_string(),
            age,
            n.reason.clone(),
        ]);
    }
    output::print_table(&rows);
}
