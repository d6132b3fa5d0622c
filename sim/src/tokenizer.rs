//! The sim's tokenizer lives in `flotilla_engine::sim_tokenizer`, so gateways key their KV
//! index with the very ids a sim charges (`--tokenizer MODEL=sim`).

pub use flotilla_engine::sim_tokenizer::*;
