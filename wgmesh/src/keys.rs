//! The node's WireGuard identity: a private key kept on disk (0600, written atomically) and in memory
//! only in zeroizing buffers. Its `Debug` is redacted and it has no `Display`, so it cannot reach a log,
//! an annotation, a status document or an error message by accident.

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use wgmesh_api::PublicKey;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

/// File name of the private key inside the state directory (same format as `wg genkey`).
pub const PRIVATE_KEY_FILE: &str = "private.key";
/// Generation and creation time of the key in `private.key`.
pub const KEY_META_FILE: &str = "key.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The content is never part of the message.
    #[error(
        "{path} does not hold a WireGuard private key (want 44 characters of base64); \
         refusing to overwrite it: move it away to let the agent generate a new key"
    )]
    Malformed { path: PathBuf },
    #[error("cannot get random bytes from the operating system")]
    Random,
}

/// A Curve25519 private key, clamped as `wg genkey` does.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

impl PrivateKey {
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom(bytes.as_mut())?;
        Ok(Self::from_bytes(*bytes))
    }

    fn from_bytes(mut bytes: [u8; 32]) -> Self {
        // Curve25519 clamping, so the stored key equals what `wg genkey` would produce.
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        let key = Self(Zeroizing::new(bytes));
        zeroize::Zeroize::zeroize(&mut bytes);
        key
    }

    pub fn public_key(&self) -> PublicKey {
        let secret = StaticSecret::from(*self.0);
        PublicKey::from_bytes(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// Lower-case hex for the WireGuard UAPI `private_key=` line.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(64));
        for b in self.0.iter() {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        s
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(*self.0))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the UAPI hex form (64 hex digits).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self::from_bytes(*bytes))
    }

    fn parse(text: &str) -> Option<Self> {
        let raw = Zeroizing::new(STANDARD.decode(text.trim()).ok()?);
        let bytes: [u8; 32] = raw.as_slice().try_into().ok()?;
        Some(Self::from_bytes(bytes))
    }
}

fn getrandom(buf: &mut [u8]) -> Result<(), Error> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own mutably.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Random);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Generation bookkeeping stored next to the key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyMeta {
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// The key and where it came from.
#[derive(Debug, Clone)]
pub struct NodeKey {
    pub private: PrivateKey,
    pub meta: KeyMeta,
    pub generated: bool,
}

/// Loads the key from `state_dir`, or generates, persists and returns a new one (generation 1).
/// A present but unreadable or malformed key file is an error: it is never overwritten.
pub fn load_or_generate(state_dir: &Path) -> Result<NodeKey, Error> {
    ensure_dir(state_dir)?;
    let path = state_dir.join(PRIVATE_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            let private =
                PrivateKey::parse(&text).ok_or_else(|| Error::Malformed { path: path.clone() })?;
            restrict_permissions(&path)?;
            let meta = read_meta(state_dir).unwrap_or(KeyMeta {
                generation: 1,
                created: now_unix(),
            });
            Ok(NodeKey {
                private,
                meta,
                generated: false,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let private = PrivateKey::generate()?;
            let meta = KeyMeta {
                generation: 1,
                created: now_unix(),
            };
            store(state_dir, &private, meta)?;
            Ok(NodeKey {
                private,
                meta,
                generated: true,
            })
        }
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// Persists `key` as the node's key: each file is written to a temporary name, synced and renamed,
/// so a crash leaves either the old or the new key, never a torn one.
pub fn store(state_dir: &Path, key: &PrivateKey, meta: KeyMeta) -> Result<(), Error> {
    ensure_dir(state_dir)?;
    let mut line = key.to_base64();
    line.push('\n');
    write_atomic(&state_dir.join(PRIVATE_KEY_FILE), line.as_bytes(), 0o600)?;
    let json = serde_json::to_vec(&meta).unwrap_or_default();
    write_atomic(&state_dir.join(KEY_META_FILE), &json, 0o600)
}

fn read_meta(state_dir: &Path) -> Option<KeyMeta> {
    let text = fs::read_to_string(state_dir.join(KEY_META_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn ensure_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| Error::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

fn restrict_permissions(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "private key file was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            Error::Write {
                path: path.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Writes `data` to `path` atomically: temp file (mode `mode`) + fsync + rename + fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_persisted_private_and_reloaded_identically() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = load_or_generate(&state).unwrap();
        assert!(first.generated);
        assert_eq!(first.meta.generation, 1);
        let mode = fs::metadata(state.join(PRIVATE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_generate(&state).unwrap();
        assert!(!again.generated);
        assert_eq!(again.private.public_key(), first.private.public_key());
        assert_eq!(again.meta, first.meta);
    }

    #[test]
    fn malformed_key_file_is_an_error_and_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PRIVATE_KEY_FILE);
        fs::write(&path, "garbage that must not be lost\n").unwrap();
        let err = load_or_generate(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }));
        assert!(
            !err.to_string().contains("garbage"),
            "content leaked into the error"
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "garbage that must not be lost\n"
        );
    }

    #[test]
    fn debug_output_never_contains_the_private_key() {
        let key = PrivateKey::generate().unwrap();
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(key.to_base64().as_str()));
        assert!(!dbg.contains(key.to_hex().as_str()));
        assert!(dbg.contains(&key.public_key().to_string()));
    }

    #[test]
    fn keys_match_wireguard_known_answer() {
        // RFC 7748 section 6.1 test vector (Alice).
        let private = PrivateKey::parse("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        let want = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        assert_eq!(private.public_key().to_string(), want);
    }

    #[test]
    fn world_readable_key_file_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path()).unwrap();
        let path = dir.path().join(PRIVATE_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        load_or_generate(dir.path()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
