//! A minimal CQL native-protocol v4 exchange (OPTIONS, STARTUP, one query) that tells whether a node serves CQL,
//! which release it runs and how many peers it knows. Not a driver: no prepared statements, paging, authentication or compression.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

const VERSION_REQUEST: u8 = 0x04;
const OP_ERROR: u8 = 0x00;
const OP_STARTUP: u8 = 0x01;
const OP_READY: u8 = 0x02;
const OP_AUTHENTICATE: u8 = 0x03;
const OP_OPTIONS: u8 = 0x05;
const OP_SUPPORTED: u8 = 0x06;
const OP_QUERY: u8 = 0x07;
const OP_RESULT: u8 = 0x08;

const FLAG_TRACING: u8 = 0x02;
const FLAG_CUSTOM_PAYLOAD: u8 = 0x04;
const FLAG_WARNING: u8 = 0x08;

/// Connects to `addr`, completes the OPTIONS/STARTUP handshake and runs
/// `SELECT release_version FROM system.local`; returns the release version.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let values = first_column(addr, timeout, "SELECT release_version FROM system.local")?;
    let value = values.into_iter().next().context("system.local returned no rows")?;
    let value = value.context("release_version is null")?;
    Ok(String::from_utf8_lossy(&value).into_owned())
}

/// The other nodes `addr` counts as members of its ring (rows of `system.peers_v2`: a node is written there once
/// it knows the peer's tokens).
pub fn peers(addr: SocketAddr, timeout: Duration) -> Result<usize> {
    Ok(first_column(addr, timeout, "SELECT peer FROM system.peers_v2")?.len())
}

/// The first column of every row `text` returns, on a connection of its own.
fn first_column(addr: SocketAddr, timeout: Duration, text: &str) -> Result<Vec<Option<Vec<u8>>>> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;

    send(&mut s, 1, OP_OPTIONS, &[])?;
    let (op, body) = recv(&mut s, 1)?;
    expect(op, OP_SUPPORTED, &body, "OPTIONS")?;

    let mut startup = Vec::new();
    startup.extend_from_slice(&1u16.to_be_bytes());
    put_string(&mut startup, "CQL_VERSION");
    put_string(&mut startup, "3.0.0");
    send(&mut s, 2, OP_STARTUP, &startup)?;
    let (op, body) = recv(&mut s, 2)?;
    if op == OP_AUTHENTICATE {
        bail!("the server asks for authentication; this probe only supports AllowAllAuthenticator");
    }
    expect(op, OP_READY, &body, "STARTUP")?;

    let mut query = Vec::new();
    let text = text.as_bytes();
    query.extend_from_slice(&(text.len() as u32).to_be_bytes());
    query.extend_from_slice(text);
    query.extend_from_slice(&0x0001u16.to_be_bytes()); // consistency ONE
    query.push(0x02); // flags: skip metadata
    send(&mut s, 3, OP_QUERY, &query)?;
    let (op, body) = recv(&mut s, 3)?;
    expect(op, OP_RESULT, &body, "QUERY")?;
    rows_first_column(&body)
}

fn send(s: &mut TcpStream, stream: i16, opcode: u8, body: &[u8]) -> Result<()> {
    let mut frame = Vec::with_capacity(9 + body.len());
    frame.push(VERSION_REQUEST);
    frame.push(0);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.push(opcode);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    s.write_all(&frame).context("writing a CQL frame")
}

fn recv(s: &mut TcpStream, stream: i16) -> Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    s.read_exact(&mut header).context("reading a CQL frame header")?;
    ensure!(
        header[0] == 0x80 | VERSION_REQUEST,
        "unexpected protocol version byte 0x{:02x} in the response",
        header[0]
    );
    let got_stream = i16::from_be_bytes([header[2], header[3]]);
    ensure!(got_stream == stream, "response for stream {got_stream}, expected {stream}");
    let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
    ensure!(len <= 16 * 1024 * 1024, "response frame of {len} bytes is too large");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).context("reading a CQL frame body")?;

    // Strip the optional prefixes the flags announce, so callers see the message body only.
    let flags = header[1];
    let mut r = Reader::new(&body);
    if flags & FLAG_TRACING != 0 {
        r.take(16)?;
    }
    if flags & FLAG_WARNING != 0 {
        let n = r.u16()?;
        for _ in 0..n {
            r.string()?;
        }
    }
    if flags & FLAG_CUSTOM_PAYLOAD != 0 {
        let n = r.u16()?;
        for _ in 0..n {
            r.string()?;
            r.bytes()?;
        }
    }
    let rest = r.rest().to_vec();
    Ok((header[4], rest))
}

fn expect(op: u8, want: u8, body: &[u8], request: &str) -> Result<()> {
    if op == want {
        return Ok(());
    }
    if op == OP_ERROR {
        let mut r = Reader::new(body);
        let code = r.i32().unwrap_or(-1);
        let msg = r.string().unwrap_or_default();
        bail!("{request} answered with error 0x{code:04x}: {msg}");
    }
    bail!("{request} answered with opcode 0x{op:02x}, expected 0x{want:02x}")
}

fn rows_first_column(body: &[u8]) -> Result<Vec<Option<Vec<u8>>>> {
    let mut r = Reader::new(body);
    let kind = r.i32()?;
    ensure!(kind == 0x0002, "query result of kind {kind}, expected rows");
    let flags = r.i32()?;
    let columns = r.i32()?;
    if flags & 0x0002 != 0 {
        r.bytes()?; // paging state
    }
    if flags & 0x0004 == 0 {
        // Metadata present despite skip_metadata: walk it (only simple column types expected).
        let global = flags & 0x0001 != 0;
        if global {
            r.string()?;
            r.string()?;
        }
        for _ in 0..columns {
            if !global {
                r.string()?;
                r.string()?;
            }
            r.string()?;
            let type_id = r.u16()?;
            ensure!(type_id != 0 && type_id < 0x0020, "unexpected column type 0x{type_id:04x}");
        }
    }
    let rows = r.i32()?;
    ensure!(columns >= 1, "the query returned no columns");
    let mut values = Vec::new();
    for _ in 0..rows {
        values.push(r.bytes()?.map(<[u8]>::to_vec));
        for _ in 1..columns {
            r.bytes()?;
        }
    }
    Ok(values)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.buf.len() >= n, "truncated CQL message");
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn rest(&self) -> &'a [u8] {
        self.buf
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn bytes(&mut self) -> Result<Option<&'a [u8]>> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.take(n as usize).map(Some)
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(values: &[Option<&[u8]>], columns: i32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&2i32.to_be_bytes()); // rows
        body.extend_from_slice(&4i32.to_be_bytes()); // no metadata
        body.extend_from_slice(&columns.to_be_bytes());
        body.extend_from_slice(&(values.len() as i32).to_be_bytes());
        for value in values {
            for column in 0..columns {
                match value.filter(|_| column == 0) {
                    Some(v) => {
                        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        body.extend_from_slice(v);
                    }
                    None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        body
    }

    #[test]
    fn a_rows_result_gives_every_rows_first_column() {
        let got = rows_first_column(&rows(&[Some(b"5.0.9"), None, Some(&[127, 0, 0, 2])], 2)).unwrap();
        assert_eq!(got, vec![Some(b"5.0.9".to_vec()), None, Some(vec![127, 0, 0, 2])]);
        assert_eq!(rows_first_column(&rows(&[], 1)).unwrap(), Vec::<Option<Vec<u8>>>::new());
        assert!(rows_first_column(&rows(&[Some(b"x")], 1)[..20]).is_err(), "a truncated result is an error");
    }
}
