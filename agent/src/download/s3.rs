//! `s3://bucket/prefix` for S3-compatible stores, with a small AWS Signature V4 signer
//! (GET object and ListObjectsV2 are all the agent needs; a full SDK would add minutes of
//! compile time for two requests). Path-style URLs (`<endpoint>/<bucket>/<key>`), which
//! MinIO, Ceph, moto and AWS accept. Credentials from `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` (optional `AWS_SESSION_TOKEN`), region from `AWS_REGION`.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

/// Where and as whom to reach S3. Its `Debug` form hides the secret key and the session
/// token.
#[derive(Clone)]
pub struct S3Config {
    /// `http(s)://host[:port]`, no trailing slash.
    pub endpoint: String,
    /// Signing region.
    pub region: String,
    /// Access key id (empty: unsigned requests, for public buckets).
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    /// Session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { "<redacted>" } else { "" };
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &hidden(!self.secret_key.is_empty()))
            .field("session_token", &hidden(self.session_token.is_some()))
            .finish()
    }
}

impl S3Config {
    /// From the endpoint flag and the standard AWS env vars.
    pub fn from_env(endpoint: &str) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        S3Config {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into()),
            access_key: var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
            secret_key: var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
            session_token: var("AWS_SESSION_TOKEN"),
        }
    }

    /// Signed headers for a body-less GET of `url` (which must start with the endpoint).
    pub fn headers_for(&self, url: &str, now: SystemTime) -> HeaderMap {
        let mut out = HeaderMap::new();
        if self.access_key.is_empty() {
            return out;
        }
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
        let (host, path_query) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
        let (path, query) = path_query.split_once('?').unwrap_or((&path_query, ""));
        let query: Vec<(String, String)> = query
            .split('&')
            .filter(|q| !q.is_empty())
            .map(|q| {
                let (k, v) = q.split_once('=').unwrap_or((q, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        let amz_date = amz_date(now);
        let empty = hex::encode(Sha256::digest(b""));
        let mut signed = vec![
            ("host".to_string(), host.to_string()),
            ("x-amz-content-sha256".to_string(), empty.clone()),
            ("x-amz-date".to_string(), amz_date.clone()),
        ];
        if let Some(t) = &self.session_token {
            signed.push(("x-amz-security-token".into(), t.clone()));
        }
        let auth = authorization(self, "GET", &percent_decode(path), &query, &signed, &empty, &amz_date);
        for (k, v) in signed.into_iter().filter(|(k, _)| k != "host").chain([("authorization".to_string(), auth)]) {
            if let (Ok(k), Ok(mut v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                v.set_sensitive(k == "authorization" || k == "x-amz-security-token");
                out.insert(k, v);
            }
        }
        out
    }
}

/// The `Authorization` header value. `path` is decoded (it is encoded here); `headers`
/// are the (lowercase name, value) pairs to sign and must include `host` and `x-amz-date`.
pub fn authorization(
    cfg: &S3Config,
    method: &str,
    path: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
    payload_hash: &str,
    amz_date: &str,
) -> String {
    let mut q: Vec<(String, String)> = query.iter().map(|(k, v)| (uri_encode(k, true), uri_encode(v, true))).collect();
    q.sort();
    let canonical_query = q.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let mut h: Vec<(String, String)> =
        headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string())).collect();
    h.sort();
    let canonical_headers: String = h.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = h.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let canonical = format!(
        "{method}\n{}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        uri_encode(path, false)
    );
    let date = &amz_date[..8.min(amz_date.len())];
    let scope = format!("{date}/{}/s3/aws4_request", cfg.region);
    let to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let k = hmac(format!("AWS4{}", cfg.secret_key).as_bytes(), date.as_bytes());
    let k = hmac(&k, cfg.region.as_bytes());
    let k = hmac(&k, b"s3");
    let k = hmac(&k, b"aws4_request");
    let sig = hex::encode(hmac(&k, to_sign.as_bytes()));
    format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={sig}", cfg.access_key)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// RFC 3986 encoding as SigV4 wants it; `/` kept in paths.
pub fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("x"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `20130524T000000Z`.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let t = flotilla_api::civil::UtcTime::from_unix(secs);
    format!("{:04}{:02}{:02}T{:02}{:02}{:02}Z", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Full key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// A ListObjectsV2 page: objects, and the continuation token when truncated.
pub fn parse_list(xml: &str) -> Result<(Vec<Object>, Option<String>), String> {
    if !xml.contains("<ListBucketResult") {
        let code = tag(xml, "Code").unwrap_or_default();
        let msg = tag(xml, "Message").unwrap_or_default();
        return Err(format!("not a bucket listing: {code} {msg}").trim().to_string());
    }
    let mut objects = Vec::new();
    for chunk in xml.split("<Contents>").skip(1) {
        let body = chunk.split("</Contents>").next().unwrap_or_default();
        let key = tag(body, "Key").ok_or("listing entry without a Key")?;
        let size = tag(body, "Size").and_then(|s| s.parse().ok()).unwrap_or(0);
        objects.push(Object { key, size });
    }
    let truncated = tag(xml, "IsTruncated").is_some_and(|t| t == "true");
    let next = if truncated { tag(xml, "NextContinuationToken") } else { None };
    Ok((objects, next))
}

fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(
        xml[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn example() -> S3Config {
        S3Config {
            endpoint: "https://examplebucket.s3.amazonaws.com".into(),
            region: "us-east-1".into(),
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// The GET Object example of AWS's "Signature Calculations for the Authorization Header".
    #[test]
    fn aws_get_object_example() {
        let h = [
            ("host".to_string(), "examplebucket.s3.amazonaws.com".to_string()),
            ("range".to_string(), "bytes=0-9".to_string()),
            ("x-amz-content-sha256".to_string(), EMPTY.to_string()),
            ("x-amz-date".to_string(), "20130524T000000Z".to_string()),
        ];
        let auth = authorization(&example(), "GET", "/test.txt", &[], &h, EMPTY, "20130524T000000Z");
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The GET Bucket (list objects) example of the same page.
    #[test]
    fn aws_list_objects_example() {
        let h = [
            ("host".to_string(), "examplebucket.s3.amazonaws.com".to_string()),
            ("x-amz-content-sha256".to_string(), EMPTY.to_string()),
            ("x-amz-date".to_string(), "20130524T000000Z".to_string()),
        ];
        let q = [("max-keys".to_string(), "2".to_string()), ("prefix".to_string(), "J".to_string())];
        let auth = authorization(&example(), "GET", "/", &q, &h, EMPTY, "20130524T000000Z");
        assert!(auth.ends_with("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"), "{auth}");
    }

    #[test]
    fn dates_and_encoding() {
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_369_353_600)), "20130524T000000Z");
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "20000229T010101Z");
        assert_eq!(uri_encode("a b/c~", false), "a%20b/c~");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        let signed = example().headers_for("https://examplebucket.s3.amazonaws.com/test.txt", UNIX_EPOCH);
        assert!(signed.get("authorization").is_some() && signed.get("x-amz-date").is_some());
        assert!(signed.get("authorization").unwrap().is_sensitive());
        assert!(!format!("{signed:?}").contains("Signature="), "{signed:?}");
    }

    #[test]
    fn debug_forms_hide_the_secret() {
        let cfg = S3Config { session_token: Some("tok-secret".into()), ..example() };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("wJalrXUtnFEMI") && !shown.contains("tok-secret"), "{shown}");
        assert!(shown.contains("AKIAIOSFODNN7EXAMPLE") && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn listing_parses() {
        let xml = r#"<?xml version="1.0"?><ListBucketResult><IsTruncated>true</IsTruncated>
            <Contents><Key>m/config.json</Key><Size>12</Size></Contents>
            <Contents><Key>m/a&amp;b.bin</Key><Size>3</Size></Contents>
            <NextContinuationToken>tok</NextContinuationToken></ListBucketResult>"#;
        let (objs, next) = parse_list(xml).unwrap();
        assert_eq!(
            objs,
            vec![Object { key: "m/config.json".into(), size: 12 }, Object { key: "m/a&b.bin".into(), size: 3 }]
        );
        assert_eq!(next.as_deref(), Some("tok"));
        assert!(parse_list("<Error><Code>NoSuchBucket</Code></Error>").unwrap_err().contains("NoSuchBucket"));
    }
}
