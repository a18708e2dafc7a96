//! The global allocator: mimalloc, asked for alignment only when a layout
//! needs more than every mimalloc block already has.
//!
//! The `mimalloc` crate's allocator passes every layout to
//! `mi_malloc_aligned`, whatever its alignment. mimalloc 3 serves that
//! from its small-block fast path only for sizes up to 1 KiB whose free
//! block happens to be aligned; anything larger that is not a power of
//! two (the boxed per-request future of about 15 KB, h2 and header
//! buffers) goes to its over-allocating path, which reserves extra room
//! to align an interior pointer and has to find the block again when it
//! is freed. Under h2c load 15 of the 91 allocations of each request
//! left the fast path, 13 of them to over-allocate, and the aligned entry
//! point was 6 % of Legate's user-space instructions (callgrind,
//! `PROTO=h2 bench/instructions.sh`). Allocating as below: 105.7k
//! instructions per h2c request instead of 109.4k, and CPU per request
//! 0.97 of before for h2c and for HTTP/1.1 (both builds loaded at the
//! same time on one core, medians of 12 and 10 rounds of 3 s).
//!
//! Every mimalloc block is at least word aligned (its size classes are
//! whole words), so a layout asking for no more than that is a plain
//! `mi_malloc`. Larger alignments still go to the aligned calls; a
//! 16-byte alignment is not assumed, because a block of an odd number of
//! words (24 or 56 bytes, say) is only 8-byte aligned, and some layouts
//! (hashbrown's tables) ask for 16 with such sizes.

use libmimalloc_sys as ffi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// The alignment every mimalloc block has: one machine word.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (see the module comment).
pub struct MiMalloc;

// SAFETY: each method forwards to the mimalloc call that serves the
// layout's size and alignment: the plain calls only where the alignment
// is at most a word, which every mimalloc block satisfies; memory from
// either kind of call is freed and resized by mimalloc, which accepts
// both. mimalloc is thread-safe.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain C calls; the layout's size is not zero (the
        // GlobalAlloc contract).
        unsafe {
            if layout.align() <= WORD {
                ffi::mi_malloc(layout.size()).cast()
            } else {
                ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if layout.align() <= WORD {
                ffi::mi_zalloc(layout.size()).cast()
            } else {
                ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: ptr came from this allocator (the caller's contract),
        // and mi_free takes blocks from the plain and the aligned calls.
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: ptr came from this allocator with `layout`, whose
        // alignment the new block keeps (the caller's contract).
        unsafe {
            if layout.align() <= WORD {
                ffi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    /// Sizes around the size classes and the 1 KiB small-block limit, the
    /// request future's size, and a large block; alignments from a byte
    /// to a page, including 16 with sizes that are odd numbers of words.
    const SIZES: [usize; 12] = [1, 7, 8, 24, 52, 56, 1000, 1025, 4096, 15344, 70000, 300000];
    const ALIGNS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 4096];

    fn fill(p: *mut u8, n: usize, seed: u8) {
        for i in 0..n {
            // SAFETY: p points to at least n bytes the test owns.
            unsafe { p.add(i).write(seed.wrapping_add(i as u8)) }
        }
    }

    fn holds(p: *const u8, n: usize, seed: u8) -> bool {
        // SAFETY: as in `fill`.
        (0..n).all(|i| unsafe { p.add(i).read() } == seed.wrapping_add(i as u8))
    }

    #[test]
    fn every_block_has_its_layouts_alignment_and_keeps_its_bytes_when_resized() {
        let a = MiMalloc;
        for &align in &ALIGNS {
            for &size in &SIZES {
                let layout = Layout::from_size_align(size, align).unwrap();
                // A few blocks of each layout, so that not only the first
                // free block of a size class is looked at.
                let blocks: Vec<*mut u8> = (0..8)
                    .map(|_| {
                        // SAFETY: the layout's size is not zero.
                        let p = unsafe { a.alloc(layout) };
                        assert!(!p.is_null(), "{size} bytes aligned {align}: no block");
                        assert_eq!(p as usize % align, 0, "{size} bytes aligned {align}");
                        p
                    })
                    .collect();
                for (i, &p) in blocks.iter().enumerate() {
                    let seed = i as u8;
                    fill(p, size, seed);
                    // Grown, then shrunk below the first size.
                    let grown = Layout::from_size_align(size * 3 + 5, align).unwrap();
                    // SAFETY: p is this allocator's, with `layout`.
                    let q = unsafe { a.realloc(p, layout, grown.size()) };
                    assert_eq!(q as usize % align, 0, "{size} grown, aligned {align}");
                    assert!(holds(q, size, seed), "{size} grown: bytes lost");
                    let shrunk = size.div_ceil(2);
                    // SAFETY: q is this allocator's, with `grown`.
                    let r = unsafe { a.realloc(q, grown, shrunk) };
                    assert_eq!(r as usize % align, 0, "{size} shrunk, aligned {align}");
                    assert!(holds(r, shrunk, seed), "{size} shrunk: bytes lost");
                    let last = Layout::from_size_align(shrunk, align).unwrap();
                    // SAFETY: r is this allocator's, with `last`.
                    unsafe { a.dealloc(r, last) };
                }
                // SAFETY: the layout's size is not zero.
                let z = unsafe { a.alloc_zeroed(layout) };
                assert_eq!(z as usize % align, 0, "zeroed {size} aligned {align}");
                // SAFETY: z points to `size` bytes.
                assert!((0..size).all(|j| unsafe { z.add(j).read() } == 0));
                // SAFETY: z is this allocator's, with `layout`.
                unsafe { a.dealloc(z, layout) };
            }
        }
    }
}
