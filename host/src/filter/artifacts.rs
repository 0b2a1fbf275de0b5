//! The on-disk cache of precompiled filter artifacts, hardened so that no
//! file the proxy did not write itself is ever mapped as native code.
//!
//! - The directory is private: created 0700, and refused (the proxy then
//!   compiles in memory) when it is not owned by the proxy's user or is
//!   group- or world-writable.
//! - Every artifact carries an HMAC-SHA256 tag under a key kept 0600 in the
//!   directory (created on first use from `/dev/urandom`). The MAC covers
//!   the component's content hash and the engine's compatibility string as
//!   well as the artifact's bytes, so a valid artifact of another component
//!   copied under this one's name is refused too.
//! - An artifact is read into memory, checked (owner, mode, tag) on the
//!   open file, and deserialized from those same bytes: nothing can swap
//!   the file between the check and the use.
//! - Artifacts are written to a 0600 temporary file and renamed into place.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use wasmtime::component::Component;
use wasmtime::Engine;

type HmacSha256 = Hmac<Sha256>;

/// Length of the tag appended to every artifact file.
const TAG_LEN: usize = 32;
/// The key's file name inside the cache directory.
const KEY_FILE: &str = "artifact.key";
/// Domain separation for the MAC (bump it when the file format changes).
const MAC_DOMAIN: &[u8] = b"sluicegate-artifact-v1\0";

/// The default cache directory: `$XDG_CACHE_HOME/sluicegate/artifacts`,
/// else `$HOME/.cache/sluicegate/artifacts`; `None` when neither is set
/// (the proxy then compiles in memory).
pub fn default_dir() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").and_then(absolute) {
        return Some(xdg.join("sluicegate").join("artifacts"));
    }
    std::env::var_os("HOME")
        .and_then(absolute)
        .map(|home| home.join(".cache").join("sluicegate").join("artifacts"))
}

/// An opened, checked cache directory and its MAC key.
pub struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Why a file or directory may not be trusted: not ours, or writable by
/// others. `what` names it in the reason.
fn untrusted(meta: &std::fs::Metadata, what: &str, path: &Path) -> Option<String> {
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Some(format!(
            "{what} {} is owned by uid {}, not by the proxy's user (uid {me})",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Some(format!(
            "{what} {} is group- or world-writable (mode {:o})",
            path.display(),
            mode & 0o7777
        ));
    }
    None
}

impl ArtifactCache {
    /// Open `dir` (creating it 0700 if missing), check that it is private,
    /// and load or create the key. The error says why the directory is
    /// refused.
    pub fn open(dir: &Path) -> Result<ArtifactCache, String> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let meta =
            std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        if let Some(reason) = untrusted(&meta, "cache directory", dir) {
            return Err(reason);
        }
        let key = load_or_create_key(dir)?;
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact of component `hash` compiled under `compat` lives.
    pub fn path(&self, hash: &str, compat: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{compat}.cwasm"))
    }

    fn mac(&self, hash: &str, compat: &str, bytes: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(MAC_DOMAIN);
        mac.update(hash.as_bytes());
        mac.update(b"\0");
        mac.update(compat.as_bytes());
        mac.update(b"\0");
        mac.update(bytes);
        mac
    }

    /// The cached artifact of component `hash`, if one is there and this
    /// proxy's user wrote it for exactly that component and engine.
    /// `Ok(None)`: no artifact; `Err`: one is there but refused (the reason).
    pub fn load(
        &self,
        engine: &Engine,
        hash: &str,
        compat: &str,
    ) -> Result<Option<Component>, String> {
        let path = self.path(hash, compat);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        // Checked on the open file: the bytes read below are this file's.
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        if let Some(reason) = untrusted(&meta, "artifact", &path) {
            return Err(reason);
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() < TAG_LEN {
            return Err(format!("{} is truncated", path.display()));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        if self.mac(hash, compat, body).verify_slice(tag).is_err() {
            return Err(format!(
                "{} was not written by this proxy for this component (bad MAC)",
                path.display()
            ));
        }
        deserialize_verified(engine, body)
            .map(Some)
            .map_err(|e| format!("{}: {e:#}", path.display()))
    }

    /// Write the artifact of component `hash` with its tag: a 0600
    /// temporary file renamed into place.
    pub fn store(&self, hash: &str, compat: &str, bytes: &[u8]) -> std::io::Result<()> {
        let tag = self.mac(hash, compat, bytes).finalize().into_bytes();
        let path = self.path(hash, compat);
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), fastrand::u64(..)));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.write_all(&tag)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// Map an artifact whose tag was verified.
///
/// This is the one `unsafe` in Sluicegate. `Component::deserialize` is
/// unsafe because wasmtime trusts the bytes to be machine code that it
/// produced itself for this engine: forged bytes could run arbitrary native
/// code inside the proxy. The invariant it needs holds here because the
/// only caller, [`ArtifactCache::load`], passes bytes that carry a valid
/// HMAC-SHA256 tag under a key that only this user's proxies hold (a 0600
/// file in a directory owned by the user and writable by nobody else, both
/// checked), over the component's content hash, the engine's compatibility
/// string and the bytes themselves; only [`ArtifactCache::store`] makes
/// such tags, from `Component::serialize` output of that very component.
/// Anyone able to read the key already runs as the proxy's user (or root)
/// and could ptrace it. wasmtime then checks the header and the engine's
/// settings again before using the code.
fn deserialize_verified(engine: &Engine, bytes: &[u8]) -> anyhow::Result<Component> {
    #[allow(unsafe_code)]
    let component = unsafe { Component::deserialize(engine, bytes) };
    component.map_err(anyhow::Error::from)
}

/// The directory's MAC key: read it (checked 0600-style: ours, and not
/// readable or writable by others), or create it. Creation writes a
/// temporary file and hard-links it into place, so two proxies starting at
/// once agree on one key.
fn load_or_create_key(dir: &Path) -> Result<[u8; 32], String> {
    let path = dir.join(KEY_FILE);
    for _ in 0..3 {
        match File::open(&path) {
            Ok(mut f) => {
                let meta = f
                    .metadata()
                    .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
                if let Some(reason) = untrusted(&meta, "artifact key", &path) {
                    return Err(reason);
                }
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(format!(
                        "artifact key {} is readable by others (mode {:o}); it must be 0600",
                        path.display(),
                        meta.permissions().mode() & 0o7777
                    ));
                }
                let mut key = [0u8; 32];
                f.read_exact(&mut key)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                return Ok(key);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                File::open("/dev/urandom")
                    .and_then(|mut r| r.read_exact(&mut key))
                    .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
                let tmp = dir.join(format!(".key-{}-{}", std::process::id(), fastrand::u64(..)));
                let made = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .and_then(|mut f| {
                        f.write_all(&key)?;
                        f.sync_all()
                    })
                    .and_then(|_| std::fs::hard_link(&tmp, &path));
                let _ = std::fs::remove_file(&tmp);
                match made {
                    Ok(()) => return Ok(key),
                    // Another process made it first: read theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
                }
            }
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        }
    }
    Err(format!("cannot read or create {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "sluicegate-artifacts-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn a_new_directory_is_private_and_its_key_stable() {
        let dir = scratch("new").join("nested");
        let a = ArtifactCache::open(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key_mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let b = ArtifactCache::open(&dir).unwrap();
        assert_eq!(a.key, b.key, "the key is made once");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_world_writable_directory_is_refused() {
        let dir = scratch("open");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ArtifactCache::open(&dir).unwrap_err();
        assert!(e.contains("world-writable"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_readable_key_is_refused() {
        let dir = scratch("key");
        ArtifactCache::open(&dir).unwrap();
        std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = ArtifactCache::open(&dir).unwrap_err();
        assert!(e.contains("readable by others"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tags_bind_the_component_and_the_bytes() {
        let dir = scratch("mac");
        let cache = ArtifactCache::open(&dir).unwrap();
        let tag = |h: &str, b: &[u8]| cache.mac(h, "c", b).finalize().into_bytes().to_vec();
        assert_eq!(tag("a", b"x"), tag("a", b"x"));
        assert_ne!(tag("a", b"x"), tag("b", b"x"), "another component");
        assert_ne!(tag("a", b"x"), tag("a", b"y"), "other bytes");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
