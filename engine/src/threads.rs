//! Thread counts, and the pools of commands that wait on the disk as much as they
//! compute.

use crate::error::{Error, Result};

/// The cores this process may use (2 when unknown).
#[must_use]
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// A rayon pool of `requested` threads (0: twice the cores, so that threads waiting on
/// I/O leave work for the others), named `name-N`, with `stack` bytes of stack each
/// (0: rayon's default).
pub fn io_pool(requested: usize, name: &'static str, stack: usize) -> Result<rayon::ThreadPool> {
    let threads = if requested == 0 {
        2 * cores()
    } else {
        requested
    };
    let mut b = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"));
    if stack > 0 {
        b = b.stack_size(stack);
    }
    b.build()
        .map_err(|e| Error::io("starting threads", std::io::Error::other(e)))
}
