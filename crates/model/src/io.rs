//! Files on disk: atomic output (every file loratune writes appears whole or not at all),
//! clean-up of the temporary files a killed process left, exclusive folder locks, and
//! checks that an output folder is not an input folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary name used while `path` is being written: same folder, so the final rename
/// is atomic on every filesystem.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], for writers that stream: `fill` writes into the temp file.
/// On any error the temp file is removed and `path` is left untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_parent(path);
    Ok(())
}

/// Makes a rename in `path`'s folder durable (best effort: not every filesystem allows it).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// The process id in a temporary name made by [`temp_path_for`] (`.NAME.tmp-PID`).
fn temp_owner(name: &str) -> Option<u32> {
    let (base, pid) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    if base.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists (on other systems than Unix: assumed to).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        if pid == std::process::id() {
            return true;
        }
        let Ok(pid) = i32::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary files that killed loratune processes left in `dir` (names made by
/// [`temp_path_for`] whose process no longer runs). Returns what it removed; a folder that
/// does not exist has none.
pub fn remove_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = temp_owner(&name).is_some_and(|pid| !process_alive(pid));
        if stale
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed.sort();
    removed
}

/// Whether `a` and `b` name the same existing file or folder (through `..`, links and
/// trailing slashes).
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Creates the output folder `dir` (and its parents) unless it exists; a file in its place
/// is an error that says so.
pub fn create_out_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Output {
            path: dir.to_path_buf(),
            reason: "is a file, expected a folder".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// The file in a locked folder that names the process holding the lock.
pub const LOCK_FILE: &str = ".loratune.lock";

/// An exclusive lock on a folder (`flock` on the folder itself), held until dropped or until
/// the process ends, however it ends: the operating system releases it.
#[derive(Debug)]
pub struct DirLock {
    _dir: std::fs::File,
    /// The holder file this lock wrote, removed when the lock is dropped.
    holder_file: Option<PathBuf>,
}

/// Locks the existing folder `dir` for this process. Nothing is written: a caller that goes
/// on to use the folder calls [`DirLock::announce`] so that others can say who holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    let handle = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(handle.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io(dir, err));
            }
            let who = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap_or_default();
            let who = who.trim();
            return Err(Error::Busy {
                path: dir.to_path_buf(),
                holder: if who.is_empty() {
                    "another process".into()
                } else {
                    who.to_string()
                },
            });
        }
    }
    Ok(DirLock {
        _dir: handle,
        holder_file: None,
    })
}

impl DirLock {
    /// Writes who holds the lock ("finetune-lora (pid N, started T)") into `dir`'s
    /// [`LOCK_FILE`], removed again when the lock is dropped.
    pub fn announce(&mut self, dir: &Path, holder: &str) -> Result<()> {
        let path = dir.join(LOCK_FILE);
        let info = format!(
            "{holder} (pid {}, started {})",
            std::process::id(),
            utc_now()
        );
        write_atomic(&path, info.as_bytes())?;
        self.holder_file = Some(path);
        Ok(())
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(p) = self.holder_file.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The current time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Peak resident memory of this process so far, in MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() {
        let dir = std::env::temp_dir().join(format!("lt-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.json");
        write_atomic(&path, b"first").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("interrupted"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("out.json"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert!(!temp_path_for(&path).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("lt-io-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A child that has exited: its pid is free (reuse within this test is not a worry).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = temp_path_for(&dir.join("a.safetensors"));
        let stale = dir.join(format!(".b.safetensors.tmp-{dead}"));
        let other = dir.join(".notes.tmp-x1");
        for p in [&mine, &stale, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir), vec![stale.clone()]);
        assert!(mine.exists() && other.exists() && !stale.exists());
        assert_eq!(temp_owner(".x.tmp-12"), Some(12));
        assert_eq!(temp_owner("x.tmp-12"), None);
        assert_eq!(temp_owner(".x.tmp-"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_locked_folder_names_its_holder() {
        let dir = std::env::temp_dir().join(format!("lt-io-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut held = lock_dir(&dir).unwrap();
        // flock locks belong to the open file, so a second open in this process conflicts.
        let err = lock_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("in use by another process"), "{err}");
        held.announce(&dir, "test-holder").unwrap();
        let err = lock_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("in use by test-holder (pid") && err.contains(&dir.display().to_string()),
            "{err}"
        );
        drop(held);
        assert!(
            !dir.join(LOCK_FILE).exists(),
            "the holder file goes with the lock"
        );
        lock_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_path_sees_through_dots_and_slashes() {
        let dir = std::env::temp_dir().join(format!("lt-io-same-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).unwrap();
        assert!(same_path(&dir.join("m"), &dir.join("m/../m/")));
        assert!(!same_path(&dir.join("m"), &dir));
        assert!(!same_path(&dir.join("m"), &dir.join("absent")));
        std::fs::write(dir.join("f"), b"").unwrap();
        let err = create_out_dir(&dir.join("f")).unwrap_err().to_string();
        assert!(err.ends_with("is a file, expected a folder"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_dates() {
        let s = utc_now();
        assert!(
            s.len() == 23 && s.ends_with(" UTC") && s.starts_with("20"),
            "{s}"
        );
    }
}
