//! The gateway's shared state, one `Arc<Gateway>` per running gateway: configuration,
//! endpoint directory, per-endpoint load, router, admission queues, tenant limits,
//! metrics, the pooled upstream HTTP(S) client (pinned to the table's engine certificates),
//! the on-demand adapter loader, the requests
//! held for models without endpoints, the demand book reported to the leader and the
//! tenants' requests in flight; the bounded metric label of a requested name.

use bytes::Bytes;
use flotilla_engine::PinnedConnector;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use std::sync::Arc;

use flotilla_api::spec::RoutingStrategy;

use crate::admission::Admission;
use crate::concurrency::InFlight;
use crate::config::Config;
use crate::demand::DemandBook;
use crate::hold::Holds;
use crate::limits::Limits;
use crate::load::LoadBook;
use crate::metrics::Metrics;
use crate::ondemand::Loader;
use crate::prompt_tokens::PromptTokenizer;
use crate::routing::prefix::PrefixConfig;
use crate::routing::Router;
use crate::table::Directory;

/// Upstream client: HTTP/1.1 with keep-alive pooling, plain to `http://` engines and TLS to
/// `https://` ones, whose certificate must be the one the endpoint table pins
/// ([`Directory::pins`]; a mismatch fails the handshake, before anything is sent).
pub type UpstreamClient = Client<crate::trace::TracedConnector<PinnedConnector>, Full<Bytes>>;

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
    pub in_flight: InFlight,
    /// Tokenizers fetched from the Models' sources.
    pub fetched_tokenizers: crate::source_tokenizers::SourceTokenizers,
}

impl Gateway {
    pub fn new(cfg: Config) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.connect_timeout));
        conn.set_nodelay(true);
        let dir = Directory::default();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(flotilla_engine::ENGINE_IDLE_REUSE)
            .pool_max_idle_per_host(1024)
            .build(crate::trace::TracedConnector(flotilla_engine::tls::connector(conn, dir.pins())));
        let router = Router::new(
            PrefixConfig {
                block_chars: cfg.prefix_block_chars,
                balance_abs: cfg.prefix_balance_abs,
                balance_rel: cfg.prefix_balance_rel,
                ..PrefixConfig::default()
            },
            cfg.kv,
        );
        let metrics = Metrics::new();
        let loader = Loader::new(&cfg);
        let demand = DemandBook::new(loader.enabled() && cfg.demand_report_interval.is_some());
        Gateway {
            limits: Limits::new(cfg.gateway_replicas),
            dir,
            book: LoadBook::default(),
            router,
            admission: Admission::default(),
            holds: Holds::new(metrics.held_requests.clone()),
            in_flight: InFlight::new(metrics.tenant_in_flight.clone()),
            demand: std::sync::Arc::new(demand),
            metrics,
            client,
            loader,
            fetched_tokenizers: Default::default(),
            cfg,
        }
    }
}

/// The label value of names clients send that are not known, so they cannot grow a metric's
/// label set.
pub const UNKNOWN_LABEL: &str = "unknown";

/// `name` as a metric label value (pure): itself when the gateway knows it, else
/// [`UNKNOWN_LABEL`]; a `model_not_found` answer is always [`UNKNOWN_LABEL`], so the
/// metrics do not tell an adapter hidden from the caller (`ownership`) from a name that
/// does not exist.
pub fn label_of(name: &str, known: bool, code: Option<crate::error::ApiCode>) -> String {
    if known && code != Some(crate::error::ApiCode::ModelNotFound) {
        name.to_string()
    } else {
        UNKNOWN_LABEL.to_string()
    }
}

impl Gateway {
    /// A name the gateway knows: a model or adapter of the endpoint table, or a watched
    /// `Model` or `Adapter` object.
    pub fn knows(&self, name: &str) -> bool {
        self.dir.model(name).is_some()
            || self.dir.adapter(name).is_some()
            || self.dir.endpoints().resolve(name).is_some()
    }

    /// The configured routing strategy of `model`: its `--routing` flag, else its Model's
    /// `routing` (`auto` when it names none).
    pub fn configured_routing(&self, model: &str) -> RoutingStrategy {
        match self.cfg.routing.iter().find(|(m, _)| m.as_str() == model) {
            Some((_, s)) => *s,
            None => self.dir.routing_of(model),
        }
    }

    /// The strategy a request for `model` asking for `s` is routed with: `auto` is
    /// `kv-aware` once the gateway keys the model's prompts with token ids and the model's
    /// engines have told it (KV events) what they hold, `least-request` until then.
    pub fn resolve_routing(&self, s: RoutingStrategy, model: &str) -> RoutingStrategy {
        match s {
            RoutingStrategy::Auto if self.token_exact(model) && self.router.kv_aware.has_events(model) => {
                RoutingStrategy::KvAware
            }
            RoutingStrategy::Auto => RoutingStrategy::LeastRequest,
            s => s,
        }
    }

    /// The strategy `model`'s requests are routed with ([`Gateway::resolve_routing`] of its
    /// configured one).
    pub fn routing_of(&self, model: &str) -> RoutingStrategy {
        self.resolve_routing(self.configured_routing(model), model)
    }

    /// `model`'s tokenizer: its `--tokenizer`, else the sim's for an `engine: sim` Model,
    /// else the one fetched from its source ([`crate::source_tokenizers`]).
    fn tokenizer_of(&self, model: &str) -> Option<Arc<dyn PromptTokenizer>> {
        if let Some(t) = self.cfg.tokenizers.get(model) {
            return Some(t.clone());
        }
        if self.dir.model(model).is_some_and(|m| m.sim_engine) {
            static SIM: std::sync::LazyLock<Arc<dyn PromptTokenizer>> =
                std::sync::LazyLock::new(|| Arc::new(crate::prompt_tokens::SimTokenizer));
            return Some(SIM.clone());
        }
        self.fetched_tokenizers.get(model)
    }

    /// Whether `model`'s prompts are keyed with the engine's token ids (it has a tokenizer).
    pub fn token_exact(&self, model: &str) -> bool {
        self.tokenizer_of(model).is_some()
    }

    /// The prompt's token ids under `model`'s tokenizer ([`Gateway::tokenizer_of`]); None
    /// without one ([`crate::prompt_tokens`]).
    pub fn prompt_tokens(&self, model: &str, kind: crate::request::ApiKind, body: &[u8]) -> Option<Vec<u32>> {
        crate::prompt_tokens::encode_with(self.tokenizer_of(model)?.as_ref(), kind, body)
    }

    /// The `model` label of a request for `name` answered with `code` ([`label_of`]).
    pub fn model_label(&self, name: &str, code: Option<crate::error::ApiCode>) -> String {
        let known = code != Some(crate::error::ApiCode::ModelNotFound) && self.knows(name);
        label_of(name, known, code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiCode;

    #[test]
    fn labels_are_known_names_or_unknown() {
        let cases = [
            ("llama", true, None, "llama"),
            ("llama", true, Some(ApiCode::ModelNotAllowed), "llama"),
            ("llama", true, Some(ApiCode::ModelNotFound), "unknown"),
            ("made-up-1234", false, Some(ApiCode::ModelNotAllowed), "unknown"),
            ("made-up-1234", false, None, "unknown"),
            ("", false, Some(ApiCode::NoEndpointTable), "unknown"),
        ];
        for (name, known, code, want) in cases {
            assert_eq!(label_of(name, known, code), want, "{name} {known} {code:?}");
        }
    }
}
