//! One preallocated swap file: the backing of one NVMe arena.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::MmapRaw;

use crate::error::{Error, IoOp, Result};

/// A swap file holding the slots of one arena. Created with mode 0600, never following a
/// symlink, preallocated to its full length, and removed when dropped: swap files are scratch,
/// never the source of truth.
pub(crate) struct SlotFile {
    file: File,
    path: PathBuf,
    /// Whether the blocks are reserved (fallocate); a mapping of a sparse file could raise
    /// SIGBUS when the disk fills, so the mmap engine requires this.
    preallocated: bool,
    map: OnceLock<Result<MmapRaw, String>>,
}

impl SlotFile {
    pub(crate) fn create(path: &Path, len: usize, direct: bool) -> Result<Self> {
        let mut flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| Error::io(IoOp::Open, path, 0, e))?;
        let mut slot_file = SlotFile {
            file,
            path: path.to_owned(),
            preallocated: false,
            map: OnceLock::new(),
        };
        // SAFETY: plain syscall on an fd we own.
        let rc = unsafe { libc::fallocate(slot_file.file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc == 0 {
            slot_file.preallocated = true;
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    log::info!("{}: fallocate unsupported ({e}); using a sparse file", path.display());
                    slot_file
                        .file
                        .set_len(len as u64)
                        .map_err(|e| Error::io(IoOp::Allocate, path, 0, e))?;
                }
                // `slot_file` is dropped here, which removes the half-made file.
                _ => return Err(Error::io(IoOp::Allocate, path, 0, e)),
            }
        }
        Ok(slot_file)
    }

    /// Writes zeros over the first `len` bytes, so that later writes rewrite blocks rather than
    /// convert reserved (unwritten) ones. Blocks of `align`-aligned zeros, four writers at once.
    pub(crate) fn fill_zeros(&self, len: usize, align: usize) -> Result<()> {
        let zeros = AlignedBuf::new(8 << 20, align.max(4096)).map_err(|e| Error::io(IoOp::Allocate, &self.path, 0, e))?;
        let blocks = len.div_ceil(zeros.len());
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..4)
                .map(|w| {
                    let zeros = &zeros;
                    s.spawn(move || (w..blocks).step_by(4).try_for_each(|b| self.write_zeros(zeros, b * zeros.len(), len)))
                })
                .collect();
            writers.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(Error::io(IoOp::Write, &self.path, 0, io::Error::other("a writer panicked")))))
        })
    }

    /// Writes one block of zeros at `off`, cut short at `end`.
    pub(crate) fn write_zeros(&self, zeros: &AlignedBuf, off: usize, end: usize) -> Result<()> {
        let n = zeros.len().min(end.saturating_sub(off));
        std::os::unix::fs::FileExt::write_all_at(&self.file, &zeros.as_slice()[..n], off as u64).map_err(|e| Error::io(IoOp::Write, &self.path, off as u64, e))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// A shared mapping of the whole file, made on first use.
    pub(crate) fn map(&self) -> io::Result<&MmapRaw> {
        let m = self.map.get_or_init(|| {
            if !self.preallocated {
                return Err("the file is sparse (fallocate unsupported); mapping it risks SIGBUS".into());
            }
            MmapRaw::map_raw(&self.file).map_err(|e| e.to_string())
        });
        m.as_ref().map_err(|e| io::Error::other(e.clone()))
    }
}

impl Drop for SlotFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("could not remove swap file {}: {e}", self.path.display());
        }
    }
}

/// A zeroed heap buffer with a chosen alignment (direct I/O's): the O_DIRECT probe's, and the
/// block of zeros that writes swap files through.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is owned; shared references only read it (writing needs `&mut`).
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align).map_err(io::Error::other)?;
        // SAFETY: the size is at least one byte; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes, owned by self, until Drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, and no reference outlives `self`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}
