//! Shared helpers for the benchmarks: units, a plain-text table, and the anchors.

pub mod torch_adamw;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

/// GiB per second for `bytes` moved in `secs`.
pub fn gib_s(bytes: f64, secs: f64) -> f64 {
    bytes / secs / (1u64 << 30) as f64
}

/// Fills a buffer with incompressible bytes derived from `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

/// Runs the fio anchor script (`fio_seq.sh DIR [extra...]`) and parses `write_gib_s=x read_gib_s=y`.
/// Returns `{"write_gib_s", "read_gib_s"}`, or `{"error"}` when it could not run.
pub fn run_fio_anchor(script: &Path, dir: &Path, extra: &str) -> Value {
    let out = match Command::new("bash").arg(script).arg(dir).args(extra.split_whitespace()).output() {
        Ok(o) => o,
        Err(e) => return json!({"error": format!("running {}: {e}", script.display())}),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (out.status.success(), field("write_gib_s"), field("read_gib_s")) {
        (true, Some(w), Some(r)) => json!({"write_gib_s": w, "read_gib_s": r}),
        _ => json!({"error": format!("{} {}", text.trim(), String::from_utf8_lossy(&out.stderr).trim())}),
    }
}

/// A plain-text table for people.
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Self {
        Table {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: &[&str]) {
        self.rows.push(cells.iter().map(|s| s.to_string()).collect());
    }

    pub fn print(&self) {
        let mut width: Vec<usize> = self.head.iter().map(String::len).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
            println!("| {} |", parts.join(" | "));
        };
        line(&self.head);
        println!("|{}|", width.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
        for r in &self.rows {
            line(r);
        }
    }
}

/// A zeroed, page-aligned buffer of `T`, as the host tier's chunk arenas are (a `Vec` of a few
/// hundred MiB comes from glibc's mmap path 16 bytes past a page boundary, so every vector
/// access of a kernel over it would straddle cache lines, which chunks never do).
pub struct PageAligned<T: bytemuck::Pod> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    layout: std::alloc::Layout,
}

impl<T: bytemuck::Pod> PageAligned<T> {
    /// `len` zeroed elements. Panics when the allocator refuses (a benchmark's set-up).
    pub fn zeroed(len: usize) -> Self {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        let layout = std::alloc::Layout::from_size_align(bytes, 4096).expect("a valid layout");
        // SAFETY: the layout's size is non-zero.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw.cast::<T>()).unwrap_or_else(|| panic!("allocating {bytes} bytes failed"));
        PageAligned { ptr, len, layout }
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let mut b = Self::zeroed(values.len());
        b.copy_from_slice(values);
        b
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for PageAligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised (zeroed, and all-zero is a valid `Pod`) elements,
        // aligned for `T` (4096 is a multiple of any Pod's alignment), alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for PageAligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> Drop for PageAligned<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, and not freed before.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

// SAFETY: the buffer is owned memory of `Pod` values, like a `Vec<T>`.
unsafe impl<T: bytemuck::Pod + Send> Send for PageAligned<T> {}
// SAFETY: shared access only reads, like `&[T]`.
unsafe impl<T: bytemuck::Pod + Sync> Sync for PageAligned<T> {}
