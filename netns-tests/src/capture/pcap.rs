//! Reading classic pcap files as tcpdump `-w` writes them (microsecond or nanosecond magic,
//! either byte order). A truncated last record (tcpdump still writing) ends the list quietly.

use std::time::Duration;

use anyhow::{Result, bail};

/// Link types the classifier understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    Ethernet,
    /// Linux cooked capture v1 (`tcpdump -i any`).
    LinuxSll,
    /// Raw IP.
    Raw,
    Other(u32),
}

impl LinkType {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Ethernet,
            113 => Self::LinuxSll,
            101 | 228 | 229 => Self::Raw,
            v => Self::Other(v),
        }
    }
}

/// One captured frame.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Time since the epoch.
    pub ts: Duration,
    /// On-the-wire length (the captured `data` may be shorter with a snap length).
    pub orig_len: u32,
    pub data: &'a [u8],
}

/// A parsed file borrowing the bytes.
#[derive(Debug)]
pub struct Pcap<'a> {
    pub link_type: LinkType,
    pub records: Vec<Record<'a>>,
}

pub fn parse(bytes: &[u8]) -> Result<Pcap<'_>> {
    if bytes.len() < 24 {
        // tcpdump writes the header when it opens the file; nothing yet means no packets.
        return Ok(Pcap {
            link_type: LinkType::Ethernet,
            records: Vec::new(),
        });
    }
    let magic_le = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let (le, nanos) = match magic_le {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        0x0a0d_0d0a => bail!("pcapng files are not supported (tcpdump -w writes pcap)"),
        m => bail!("not a pcap file (magic {m:#010x})"),
    };
    let u32_at = |off: usize| -> u32 {
        let b = [bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]];
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let link_type = LinkType::from_u32(u32_at(20) & 0x0fff_ffff);
    let mut records = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let secs = u32_at(off);
        let frac = u32_at(off + 4);
        let incl = u32_at(off + 8) as usize;
        let orig_len = u32_at(off + 12);
        let start = off + 16;
        let Some(data) = bytes.get(start..start + incl) else {
            break;
        };
        let frac = if nanos {
            Duration::from_nanos(frac.into())
        } else {
            Duration::from_micros(frac.into())
        };
        records.push(Record {
            ts: Duration::from_secs(secs.into()) + frac,
            orig_len,
            data,
        });
        off = start + incl;
    }
    Ok(Pcap { link_type, records })
}

#[cfg(test)]
pub(crate) fn write(records: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    for v in [0u32, 0, 262_144, 1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (i, r) in records.iter().enumerate() {
        let len = u32::try_from(r.len()).expect("small");
        for v in [u32::try_from(i).expect("small"), 0, len, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_tolerates_a_partial_tail() {
        let mut file = write(&[b"abc", b"defg"]);
        let p = parse(&file).expect("parses");
        assert_eq!(p.link_type, LinkType::Ethernet);
        assert_eq!(p.records.len(), 2);
        assert_eq!(p.records[1].data, b"defg");
        file.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&file).expect("parses").records.len(), 2);
    }

    #[test]
    fn rejects_other_files() {
        assert!(parse(&[0u8; 24]).is_err());
        assert!(parse(&[]).expect("empty is fine").records.is_empty());
    }
}
