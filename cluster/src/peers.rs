//! gRPC channels to other servers, created lazily and shared (one HTTP/2 connection per
//! peer address, reconnected by tonic when it drops). Addresses go through
//! `FLOTILLA_DIAL_MAP` ([`flotilla_api::dial`]) before dialing.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Default)]
pub(crate) struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// Turns `host:port` (or a full URL) into an endpoint URL.
pub(crate) fn endpoint_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

impl Peers {
    pub(crate) fn channel(&self, addr: &str) -> Channel {
        let mut map = self.channels.lock().expect("peers lock");
        map.entry(addr.to_owned())
            .or_insert_with(|| {
                Endpoint::from_shared(endpoint_url(&flotilla_api::dial::dial_address(addr)))
                    .unwrap_or_else(|_| Endpoint::from_static("http://0.0.0.0:1"))
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .keep_alive_while_idle(true)
                    .connect_lazy()
            })
            .clone()
    }
}
