//! One module per subcommand group.
pub(crate) mod audit;
pub(crate) mod cluster;
pub(crate) mod dev;
pub(crate) mod events;
pub(crate) mod gateway;
pub(crate) mod node;
pub(crate) mod objects;
pub(crate) mod rollout;
pub(crate) mod scale;
pub(crate) mod server;
pub(crate) mod snapshot;
pub(crate) mod tenant;
pub(crate) mod tls;
pub(crate) mod token;
pub(crate) mod wait;
