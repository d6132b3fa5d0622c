//! A fake leader's `AutoscaleService`: `ReportDemand` is recorded with its arrival time (or
//! answered `cluster.not_leader` with a hint, as a follower does). Served next to
//! [`FakeCp`]'s FleetService and ObjectService on one port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use flotilla_api::pb;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::fake_cp::FakeCp;

#[derive(Clone, Default)]
pub struct FakeAutoscale {
    pub reports: Arc<Mutex<Vec<(Instant, pb::ReportDemandRequest)>>>,
    /// When set, every call answers not_leader with this hint.
    pub not_leader: Option<String>,
}

impl FakeAutoscale {
    pub fn follower(leader: SocketAddr) -> Self {
        FakeAutoscale { not_leader: Some(leader.to_string()), ..Default::default() }
    }

    /// Every report received so far.
    pub fn reports(&self) -> Vec<pb::ReportDemandRequest> {
        self.reports.lock().unwrap().iter().map(|(_, r)| r.clone()).collect()
    }

    /// `model`'s entries of every report so far, oldest first, with their arrival time.
    pub fn of(&self, model: &str) -> Vec<(Instant, pb::ModelDemand)> {
        let g = self.reports.lock().unwrap();
        g.iter().flat_map(|(t, r)| r.models.iter().filter(|m| m.model == model).map(move |m| (*t, m.clone()))).collect()
    }

    /// The sum of a counter of `model` over every report so far.
    pub fn sum(&self, model: &str, f: impl Fn(&pb::ModelDemand) -> u32) -> u32 {
        self.of(model).iter().map(|(_, m)| f(m)).sum()
    }

    /// Serves FleetService and ObjectService (from `cp`) and AutoscaleService on one port.
    pub async fn serve(self, cp: FakeCp) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let fleet = pb::fleet_service_server::FleetServiceServer::new(cp.clone());
        let objects = pb::object_service_server::ObjectServiceServer::new(cp);
        let autoscale = pb::autoscale_service_server::AutoscaleServiceServer::new(self);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(fleet)
                .add_service(objects)
                .add_service(autoscale)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        (addr, tx)
    }
}

#[tonic::async_trait]
impl pb::autoscale_service_server::AutoscaleService for FakeAutoscale {
    async fn report_demand(
        &self,
        r: Request<pb::ReportDemandRequest>,
    ) -> Result<Response<pb::ReportDemandResponse>, Status> {
        if let Some(l) = &self.not_leader {
            return Err(Status::failed_precondition(format!("cluster.not_leader: leader={l}")));
        }
        self.reports.lock().unwrap().push((Instant::now(), r.into_inner()));
        Ok(Response::new(pb::ReportDemandResponse {}))
    }
}
