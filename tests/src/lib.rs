//! Cross-crate integration tests (in `tests/`): in-process clusters of real servers on
//! loopback. The cluster they run is `flotilla_testkit::cluster::TestCluster`, shared with
//! the actors' tests; this library itself holds nothing.
