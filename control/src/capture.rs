//! `switchyard capture`: read a port's copy stream from the daemon and write it as pcap
//! (readable by tcpdump and Wireshark), or print a line per frame.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;
use serde_json::json;

use crate::error::{Error, Result};
use crate::proto::{self, Request, Response, CAPTURE_RECORD_HEADER};

/// Largest frame a record may carry (a 65520-byte MTU plus headers); anything bigger means the
/// stream is corrupt.
const MAX_RECORD: usize = 65_536 + 64;

/// One record of the stream.
pub struct Record {
    pub to_container: bool,
    pub micros: u64,
    pub frame: Vec<u8>,
}

/// Read one record; `None` at a clean end of stream.
pub fn read_record(r: &mut impl Read) -> Result<Option<Record>> {
    let mut h = [0u8; CAPTURE_RECORD_HEADER];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => {
            return Err(Error::unavailable(format!(
                "reading the capture stream: {e}"
            )))
        }
    }
    let micros = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(h[9..13].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD || h[0] > 1 {
        return Err(Error::internal("corrupt capture stream"));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame)
        .map_err(|e| Error::unavailable(format!("reading the capture stream: {e}")))?;
    Ok(Some(Record {
        to_container: h[0] == 1,
        micros,
        frame,
    }))
}

fn summary(r: &Record) -> String {
    let f = &r.frame;
    let mac = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let (src, dst, et) = if f.len() >= 14 {
        (
            mac(&f[6..12]),
            mac(&f[0..6]),
            format!("0x{:02x}{:02x}", f[12], f[13]),
        )
    } else {
        ("?".into(), "?".into(), "runt".into())
    };
    let secs = r.micros / 1_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:06} {} {src} > {dst} ethertype {et} length {}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        r.micros % 1_000_000,
        if r.to_container { "to  " } else { "from" },
        f.len()
    )
}

pub fn run(
    socket: &Path,
    network: &str,
    name: &str,
    write: Option<&Path>,
    count: Option<u64>,
) -> Result<i32> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        Error::unavailable(format!(
            "cannot reach the daemon at {}: {e} (is `switchyard daemon` running?)",
            socket.display()
        ))
    })?;
    let req = Request {
        v: proto::VERSION,
        id: 1,
        method: "capture".into(),
        params: json!({ "network": network, "name": name }),
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| Error::internal(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| Error::unavailable(format!("sending to the daemon: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head)
        .map_err(|e| Error::unavailable(format!("reading the daemon's reply: {e}")))?;
    let resp: Response = serde_json::from_str(&head)
        .map_err(|e| Error::internal(format!("malformed reply: {e}")))?;
    if !resp.ok {
        return Err(resp
            .error
            .unwrap_or_else(|| Error::internal("capture refused")));
    }
    r.get_ref().set_read_timeout(None)?;
    let out: Option<Box<dyn Write>> = match write {
        None => None,
        Some(p) if p == Path::new("-") => Some(Box::new(std::io::stdout().lock())),
        Some(p) => {
            Some(Box::new(std::fs::File::create(p).map_err(|e| {
                Error::system(format!("creating {}: {e}", p.display()))
            })?))
        }
    };
    let mut pcap = match out {
        Some(w) => Some(
            PcapWriter::with_header(
                w,
                PcapHeader {
                    datalink: DataLink::ETHERNET,
                    snaplen: 65_535 + 18,
                    ..Default::default()
                },
            )
            .map_err(|e| Error::system(format!("writing pcap: {e}")))?,
        ),
        None => None,
    };
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) {
        let Some(rec) = read_record(&mut r)? else {
            break;
        };
        match &mut pcap {
            Some(w) => {
                let ts = Duration::from_micros(rec.micros);
                w.write_packet(&PcapPacket::new(ts, rec.frame.len() as u32, &rec.frame))
                    .map_err(|e| Error::system(format!("writing pcap: {e}")))?;
            }
            None => println!("{}", summary(&rec)),
        }
        n += 1;
    }
    if let Some(w) = pcap {
        let mut inner = w.into_writer();
        inner.flush()?;
    }
    if write.is_some_and(|p| p != Path::new("-")) {
        eprintln!("{n} frames captured");
    }
    Ok(0)
}
