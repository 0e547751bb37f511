//! The persisted state file: networks, endpoints and published ports, written atomically
//! (write a temporary file, fsync, rename, fsync the directory) after every change.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use switchyard_switch::MacAddr;

use crate::error::{Error, Result};
use crate::ipam::Ipv4Net;
use crate::proto::EndpointType;
use crate::spec::PortMapping;

pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointRecord {
    pub name: String,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub netns: String,
    pub pid: Option<i32>,
    /// Inode of the namespace when attached: the namespace at `netns` must still be this one.
    pub ns_inode: u64,
    pub ifname: String,
    #[serde(rename = "type")]
    pub kind: EndpointType,
    pub host_ifname: Option<String>,
    pub ports: Vec<PortMapping>,
    /// Set for endpoints Docker made through the network driver API (its endpoint id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_endpoint: Option<String>,
    /// DNS aliases (`connect --alias`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The namespace came as a file descriptor (`netns` is not a path the daemon can open): its
    /// engine drives the endpoint's life (CNI DEL) and a restart finds the namespace through a
    /// process in it (`ns_inode`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ns_by_fd: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NetworkRecord {
    pub id: String,
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub gateway_mac: MacAddr,
    pub internal: bool,
    pub mtu: u32,
    /// Search domains of the network's containers (`network create --dns-search`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    pub created: u64,
    pub endpoints: Vec<EndpointRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Persisted {
    pub format: u32,
    pub networks: Vec<NetworkRecord>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Write `st` to `dir/state.json` atomically.
pub fn save(dir: &Path, st: &Persisted) -> Result<()> {
    let body = serde_json::to_vec_pretty(&Persisted {
        format: FORMAT,
        networks: st.networks.clone(),
    })
    .map_err(|e| Error::internal(format!("encoding state: {e}")))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let ctx =
        |what: &str, e: std::io::Error| Error::system(format!("{what} {}: {e}", tmp.display()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ctx("creating", e))?;
    f.write_all(&body).map_err(|e| ctx("writing", e))?;
    f.sync_all().map_err(|e| ctx("syncing", e))?;
    drop(f);
    fs::rename(&tmp, path(dir)).map_err(|e| ctx("renaming", e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What `load` found.
#[derive(Debug)]
pub enum Loaded {
    Missing,
    Ok(Persisted),
    /// Unreadable: moved aside to the given path (never silently replaced).
    Corrupt {
        moved_to: PathBuf,
        why: String,
    },
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let p = path(dir);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(Error::system(format!("reading {}: {e}", p.display()))),
    };
    match serde_json::from_slice::<Persisted>(&bytes) {
        Ok(st) if st.format == FORMAT => Ok(Loaded::Ok(st)),
        other => {
            let why = match other {
                Ok(st) => format!("unknown format {}", st.format),
                Err(e) => e.to_string(),
            };
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let moved_to = dir.join(format!("{STATE_FILE}.corrupt-{secs}"));
            fs::rename(&p, &moved_to)
                .map_err(|e| Error::system(format!("moving aside {}: {e}", p.display())))?;
            Ok(Loaded::Corrupt { moved_to, why })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sy-state-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn sample() -> Persisted {
        Persisted {
            format: FORMAT,
            networks: vec![NetworkRecord {
                id: "ab".repeat(32),
                name: "mynet".into(),
                subnet: "10.77.0.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 77, 0, 1),
                gateway_mac: "02:00:00:00:00:01".parse().unwrap(),
                internal: false,
                mtu: 1500,
                dns_search: vec!["corp.test".into()],
                created: 1,
                endpoints: vec![EndpointRecord {
                    name: "c1".into(),
                    ip: Ipv4Addr::new(10, 77, 0, 2),
                    mac: "02:00:00:00:00:02".parse().unwrap(),
                    netns: "/run/netns/c1".into(),
                    pid: None,
                    ns_inode: 42,
                    ifname: "eth0".into(),
                    kind: EndpointType::Tap,
                    host_ifname: None,
                    ports: vec![],
                    docker_endpoint: None,
                    aliases: vec![],
                    ns_by_fd: false,
                }],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let d = tmpdir();
        assert!(matches!(load(&d).unwrap(), Loaded::Missing));
        save(&d, &sample()).unwrap();
        match load(&d).unwrap() {
            Loaded::Ok(st) => assert_eq!(st, sample()),
            other => panic!("{other:?}"),
        }
        assert!(!d.join("state.json.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_file_is_kept_aside() {
        let d = tmpdir();
        save(&d, &sample()).unwrap();
        let full = fs::read(path(&d)).unwrap();
        fs::write(path(&d), &full[..full.len() / 2]).unwrap();
        match load(&d).unwrap() {
            Loaded::Corrupt { moved_to, .. } => {
                assert_eq!(fs::read(&moved_to).unwrap(), &full[..full.len() / 2]);
                assert!(!path(&d).exists());
            }
            other => panic!("{other:?}"),
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
