//! The harness's own gRPC connections to the servers (store clients, watchers, status
//! polls): plain, or with TLS as the run's admin identity when the topology runs with
//! `tls: true` (every process then gets certificates made for the run; see
//! [`crate::cluster::Cluster::start`]).

use std::sync::Arc;
use std::time::Duration;

use flotilla_security::Tls;
use tonic::transport::{Channel, Endpoint};

/// How the harness dials servers.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<Tls>>,
}

impl Dialer {
    pub fn new(tls: Option<Arc<Tls>>) -> Self {
        Dialer { tls }
    }

    /// A connected channel to `addr`, or None when it cannot connect in time.
    pub async fn channel(&self, addr: &str, connect: Duration, timeout: Duration) -> Option<Channel> {
        let ep = Endpoint::from_shared(format!("http://{addr}")).ok()?.connect_timeout(connect).timeout(timeout);
        flotilla_security::connect::connect(ep, self.tls.as_ref(), addr).await.ok()
    }
}
