//! A minimal HTTP/1.1 keep-alive client for the load generator: one connection per
//! client, one request in flight on it, the request bytes built once. A general client
//! (connection pool, URL parsing, header maps, per-request timers) costs a multiple of
//! this per request, and the load generator shares the machine with the system under
//! test.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One keep-alive connection.
pub struct Connection {
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// A response: status code and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Time a request may take before the connection is given up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The bytes of a `POST` of a JSON body.
pub fn post_json(host: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

impl Connection {
    /// A connection to `addr` (`host:port`), opened at the first request.
    pub fn new(addr: &str) -> Connection {
        Connection { addr: addr.to_owned(), stream: None, buf: Vec::with_capacity(4096) }
    }

    /// Sends `request` (as built by [`post_json`]) and reads the response. A failed
    /// connection is closed; the next request opens a new one.
    pub async fn send(&mut self, request: &[u8]) -> anyhow::Result<Response> {
        let r = tokio::time::timeout(TIMEOUT, self.exchange(request)).await.context("request timed out");
        let r = r.and_then(|r| r);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Response> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed before the response head");
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head is not UTF-8")?;
        let status = head.get(9..12).and_then(|s| s.parse().ok()).context("malformed status line")?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
            })
            .context("response without content-length")?;
        let keep_alive = !head.lines().any(|l| l.eq_ignore_ascii_case("connection: close"));
        while self.buf.len() < head_end + len {
            if stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed inside the response body");
            }
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        if !keep_alive {
            self.stream = None;
        }
        Ok(Response { status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_carries_its_length_and_body() {
        let req = post_json("h:1", "/p", b"{}");
        assert_eq!(
            req,
            b"POST /p HTTP/1.1\r\nhost: h:1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    /// A server that answers each request with `answers[i]`, written in two pieces.
    async fn server(answers: Vec<&'static [u8]>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for answer in answers {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let (a, b) = answer.split_at(answer.len() / 2);
                s.write_all(a).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.write_all(b).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn responses_are_read_to_their_length_on_one_connection() {
        let addr = server(vec![
            b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
            b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 2\r\n\r\n{}",
        ])
        .await;
        let mut c = Connection::new(&addr);
        let req = post_json(&addr, "/", b"{}");
        let r = c.send(&req).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, b"{\"a\":1}".as_slice()));
        let r = c.send(&req).await.unwrap();
        assert_eq!((r.status, r.body.as_slice()), (422, b"{}".as_slice()));
    }
}
