//! The gateway's shared state, one `Arc<Gateway>` per running gateway: configuration,
//! endpoint directory, per-endpoint load, router, admission queues, tenant limits,
//! metrics, the pooled upstream HTTP client, the on-demand adapter loader, the requests
//! held for models without endpoints and the demand book reported to the leader.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::admission::Admission;
use crate::config::Config;
use crate::demand::DemandBook;
use crate::hold::Holds;
use crate::limits::Limits;
use crate::load::LoadBook;
use crate::metrics::Metrics;
use crate::ondemand::Loader;
use crate::routing::prefix::PrefixConfig;
use crate::routing::Router;
use crate::table::Directory;

/// Upstream client: HTTP/1.1 with keep-alive pooling.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

pub struct Gateway {
    pub cfg: Config,
    pub dir: Directory,
    pub book: LoadBook,
    pub router: Router,
    pub admission: Admission,
    pub limits: Limits,
    pub metrics: Metrics,
    pub client: UpstreamClient,
    pub loader: Loader,
    pub holds: Holds,
    pub demand: std::sync::Arc<DemandBook>,
}

impl Gateway {
    pub fn new(cfg: Config) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.connect_timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(flotilla_engine::ENGINE_IDLE_REUSE)
            .pool_max_idle_per_host(1024)
            .build(conn);
        let router = Router::new(PrefixConfig {
            block_chars: cfg.prefix_block_chars,
            balance_abs: cfg.prefix_balance_abs,
            balance_rel: cfg.prefix_balance_rel,
            ..PrefixConfig::default()
        });
        let metrics = Metrics::new();
        let loader = Loader::new(&cfg);
        let demand = DemandBook::new(loader.enabled() && cfg.demand_report_interval.is_some());
        Gateway {
            limits: Limits::new(cfg.gateway_replicas),
            dir: Directory::default(),
            book: LoadBook::default(),
            router,
            admission: Admission::default(),
            holds: Holds::new(metrics.held_requests.clone()),
            demand: std::sync::Arc::new(demand),
            metrics,
            client,
            loader,
            cfg,
        }
    }
}
