//! Per-engine API keys. Each engine the agent starts gets its own: 256 bits from the
//! operating system's random source, hex-encoded (64 characters). The engine reads it from
//! `VLLM_API_KEY` (vLLM and the sim alike), so it never appears on a command line; the
//! agent records it in its state file (mode 0600) to keep using it with an adopted engine,
//! and reports it with the engine, so the servers can give it to gateways.

use flotilla_engine::EngineKey;
use rand::TryRngCore as _;

/// The environment variable engines read their key from.
pub const ENV: &str = "VLLM_API_KEY";

/// A fresh key, or why the random source failed.
pub fn generate() -> Result<EngineKey, String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| format!("cannot generate an engine API key: {e}"))?;
    Ok(EngineKey::new(&hex::encode(bytes)).expect("hex is visible ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_256_random_bits_in_hex() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
