//! Model and adapter source URIs: `file://`, `http(s)://`, `s3://`, `hf://`.
use crate::ApiError;

const SCHEMES: [&str; 5] = ["file://", "http://", "https://", "s3://", "hf://"];

/// Checks that `source` is a non-empty URI with a supported scheme and a non-empty rest.
pub fn validate_source(field: &str, source: &str) -> Result<(), ApiError> {
    if source.trim().is_empty() {
        return Err(ApiError::invalid(field, "is empty; give a URI such as hf://org/model or file:///models/x"));
    }
    let Some(scheme) = SCHEMES.iter().find(|s| source.starts_with(**s)) else {
        return Err(ApiError::invalid(
            field,
            format!("{source:?} has an unsupported scheme; use one of file://, http://, https://, s3://, hf://"),
        ));
    };
    if source[scheme.len()..].trim().is_empty() {
        return Err(ApiError::invalid(field, format!("{source:?} names no path after {scheme}")));
    }
    if source.len() > 2048 {
        return Err(ApiError::invalid(field, "is longer than 2048 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert!(validate_source("spec.source", "hf://meta-llama/Llama-3").is_ok());
        assert!(validate_source("spec.source", "file:///m").is_ok());
        assert!(validate_source("spec.source", "").is_err());
        assert!(validate_source("spec.source", "hf://").is_err());
        let e = validate_source("spec.source", "ftp://x").unwrap_err().to_string();
        assert!(e.starts_with("spec.source:") && e.contains("ftp://x"), "{e}");
    }
}
