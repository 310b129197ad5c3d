//! Probing a directory for direct I/O: whether O_DIRECT is accepted, and the alignment it needs.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::file::AlignedBuf;

/// What direct I/O needs on a file system: buffer, length and offset alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIo {
    pub align: usize,
}

/// Returns `Ok(Some)` when O_DIRECT works in `dir`, `Ok(None)` with the reason when the file
/// system refuses it (tmpfs, some network file systems), `Err` when the directory is unusable.
pub(crate) fn probe_direct(dir: &Path) -> io::Result<Result<DirectIo, String>> {
    let path = dir.join(format!(".stowage-probe-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_file(&path);
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Ok(Err(format!("the file system under {} refuses O_DIRECT", dir.display())));
        }
        Err(e) => return Err(e),
    };
    let result = find_alignment(&file);
    drop(file);
    let _ = std::fs::remove_file(&path);
    result
}

fn find_alignment(file: &std::fs::File) -> io::Result<Result<DirectIo, String>> {
    const MAX: usize = 64 * 1024;
    let mut buf = AlignedBuf::new(2 * MAX, MAX)?;
    if let Err(e) = file.write_all_at(buf.as_mut(), 0) {
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(Err(format!("O_DIRECT write of {MAX} aligned bytes refused: {e}")));
        }
        return Err(e);
    }
    // The smallest size that the file system accepts at an address and offset of that alignment.
    let mut align = 512;
    while align <= MAX {
        let slice = &mut buf.as_mut()[align..2 * align];
        match file.read_at(slice, align as u64) {
            Ok(n) if n == align => return Ok(Ok(DirectIo { align })),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
        align *= 2;
    }
    Ok(Err("no O_DIRECT alignment up to 64 KiB works".into()))
}
