//! The store's disk made full on demand: a real tmpfs where mounting one is
//! allowed (root, as in CI and on the dev box), else the store's
//! `store-write` failpoint (a build with `--features failpoints`), which
//! makes the store read its disk as having the bytes a flag file holds
//! free (none when it is empty) while that file exists: writes are refused
//! as on a full disk, by the same check.

use std::path::{Path, PathBuf};

/// A tmpfs of a given size mounted on a directory while it lives.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None where mounting is not allowed.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status();
        mounted.is_ok_and(|s| s.success()).then(|| Tmpfs(dir.to_owned()))
    }

    /// Gives it a new size in place (what it holds stays).
    pub fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remounting {} with size {size}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` with `path` until it refuses more.
pub fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 1 << 20];
    while file.write_all(&chunk).and_then(|()| file.sync_all()).is_ok() {}
}

/// A disk for a daemon's store that a test fills and frees.
pub enum FullDisk {
    /// A real tmpfs, filled with a file.
    Tmpfs { _tmpfs: Tmpfs, filler: PathBuf },
    /// The `store-write` failpoint and its flag file.
    Failpoint { flag: PathBuf },
}

impl FullDisk {
    /// Every kind of full disk this machine and build can make: a tmpfs
    /// (root), the failpoint (`--features failpoints`).
    pub const KINDS: [&'static str; 2] = ["tmpfs", "failpoint"];

    /// A disk of `kind` ([`FullDisk::KINDS`]) and `size` (a tmpfs's) for
    /// the store of a daemon whose data directory is `data` (its store is
    /// `data/store`), with `scratch` for its own files; None where this
    /// machine or build can't make it.
    pub fn new(kind: &str, scratch: &Path, data: &Path, size: &str) -> Option<FullDisk> {
        std::fs::create_dir_all(data).unwrap();
        match kind {
            "tmpfs" => {
                let disk = scratch.join("disk");
                let tmpfs = Tmpfs::mount(&disk, size)?;
                std::os::unix::fs::symlink(&disk, data.join("store")).unwrap();
                Some(FullDisk::Tmpfs {
                    _tmpfs: tmpfs,
                    filler: disk.join("filler"),
                })
            }
            _ => cfg!(feature = "failpoints").then(|| FullDisk::Failpoint {
                flag: scratch.join("disk-full"),
            }),
        }
    }

    /// What the daemon's environment needs for this disk.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            FullDisk::Tmpfs { .. } => Vec::new(),
            FullDisk::Failpoint { flag } => vec![("FAILPOINTS", format!("store-write=return({})", flag.display()))],
        }
    }

    /// "a tmpfs" or "the store-write failpoint", for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            FullDisk::Tmpfs { .. } => "a tmpfs",
            FullDisk::Failpoint { .. } => "the store-write failpoint",
        }
    }

    /// No room left.
    pub fn fill(&self) {
        match self {
            FullDisk::Tmpfs { filler, .. } => fill(filler),
            FullDisk::Failpoint { flag } => std::fs::write(flag, "0").unwrap(),
        }
    }

    /// No room left but `bytes` (a tmpfs's: the failpoint's has none).
    pub fn fill_leaving(&self, bytes: u64) {
        self.fill();
        if let FullDisk::Tmpfs { filler, .. } = self {
            let file = std::fs::OpenOptions::new().write(true).open(filler).unwrap();
            file.set_len(file.metadata().unwrap().len().saturating_sub(bytes))
                .unwrap();
        }
    }

    /// Room again.
    pub fn free(&self) {
        match self {
            FullDisk::Tmpfs { filler, .. } => std::fs::remove_file(filler).unwrap(),
            FullDisk::Failpoint { flag } => std::fs::remove_file(flag).unwrap(),
        }
    }
}
