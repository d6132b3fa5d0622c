//! A raw HTTP/1.1 client over a plain TCP stream, one request per connection
//! (`Connection: close`), for tests that talk to engines and gateways without a client
//! crate: a blocking one for plain `#[test]`s and an async one for tokio tests. The request
//! text and the reading of the answer are pure functions, shared by both.

use std::time::Duration;

/// How long [`http_request`] waits for a whole answer.
pub const ASYNC_LIMIT: Duration = Duration::from_secs(5);

/// The request text: `method path`, a JSON content type, the body's length, the body.
pub fn request_text(addr: &str, method: &str, path: &str, body: &str) -> String {
    request_text_with(addr, method, path, body, &[])
}

/// [`request_text`] with extra header lines.
pub fn request_text_with(addr: &str, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> String {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The status code of a raw answer (`HTTP/1.1 200 OK...` → 200).
pub fn status_code(raw: &str) -> Option<u16> {
    raw.split_whitespace().nth(1)?.parse().ok()
}

/// The body of a raw answer: everything after the blank line (empty without one).
pub fn body_of(raw: &str) -> &str {
    raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default()
}

/// Sends one request and reads until the server closes or `read_timeout` passes between
/// reads; the whole raw answer (head and body), or `None` if it could not connect or write.
pub fn send_blocking(addr: &str, method: &str, path: &str, body: &str, read_timeout: Duration) -> Option<String> {
    send_blocking_with(addr, method, path, body, read_timeout, &[])
}

/// [`send_blocking`] with extra header lines.
pub fn send_blocking_with(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    read_timeout: Duration,
    headers: &[(&str, &str)],
) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    s.write_all(request_text_with(addr, method, path, body, headers).as_bytes()).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// An async request bounded by [`ASYNC_LIMIT`]; (status, body), or `None` if it could not
/// connect, write, or read a status in time.
pub async fn http_request(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    http_request_with(addr, method, path, body, &[]).await
}

/// [`http_request`] with extra header lines.
pub async fn http_request_with(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(request_text_with(addr, method, path, body, headers).as_bytes()).await.ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        Some((status_code(&text)?, body_of(&text).to_owned()))
    };
    tokio::time::timeout(ASYNC_LIMIT, fut).await.ok().flatten()
}

/// [`http_request`] with an engine's API key: `Authorization: Bearer KEY` (no header for an
/// empty key).
pub async fn http_request_with_key(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    key: &str,
) -> Option<(u16, String)> {
    let auth = format!("Bearer {key}");
    let headers: &[(&str, &str)] = if key.is_empty() { &[] } else { &[("Authorization", auth.as_str())] };
    http_request_with(addr, method, path, body, headers).await
}

/// `GET path` with [`http_request`].
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, "").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_length_and_closes() {
        assert_eq!(
            request_text("h:1", "POST", "/v1/x", "{}"),
            "POST /v1/x HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        );
        assert!(request_text("h:1", "GET", "/", "").ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n"));
        let keyed = request_text_with("h:1", "GET", "/v1/models", "", &[("Authorization", "Bearer k")]);
        assert!(keyed.contains("\r\nAuthorization: Bearer k\r\n"), "{keyed}");
    }

    #[test]
    fn answers_split_into_status_and_body() {
        let table: &[(&str, Option<u16>, &str)] = &[
            ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", Some(200), "{}"),
            ("HTTP/1.1 404 Not Found\r\n\r\n", Some(404), ""),
            ("HTTP/1.1 503 x\r\n\r\na\r\n\r\nb", Some(503), "a\r\n\r\nb"),
            ("HTTP/1.1 200 OK\r\nno end of head", Some(200), ""),
            ("", None, ""),
            ("garbage", None, ""),
        ];
        for (raw, status, body) in table {
            assert_eq!(status_code(raw), *status, "{raw:?}");
            assert_eq!(body_of(raw), *body, "{raw:?}");
        }
    }

    /// A one-shot server answering `answer` to whatever it is sent; returns its address.
    fn serve_once(answer: &'static str) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn a_blocking_request_reads_the_whole_answer() {
        let addr = serve_once("HTTP/1.1 200 OK\r\n\r\nhello");
        let raw = send_blocking(&addr, "GET", "/", "", Duration::from_secs(5)).expect("answered");
        assert_eq!((status_code(&raw), body_of(&raw)), (Some(200), "hello"));
    }

    #[tokio::test]
    async fn an_async_request_returns_status_and_body() {
        let addr = serve_once("HTTP/1.1 201 Created\r\n\r\n{\"ok\":true}");
        assert_eq!(http_get(&addr, "/").await, Some((201, "{\"ok\":true}".to_owned())));
    }

    #[tokio::test]
    async fn nobody_listening_is_none() {
        let port = crate::ports::free_port().expect("port");
        assert_eq!(http_get(&format!("127.0.0.1:{port}"), "/").await, None);
        assert!(send_blocking(&format!("127.0.0.1:{port}"), "GET", "/", "", Duration::from_secs(1)).is_none());
    }
}
