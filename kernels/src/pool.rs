//! A persistent pool of compute threads for the forward pass.
//!
//! `run` hands one closure to every thread (the caller included) and returns when all have
//! finished. Between jobs the workers spin briefly, because the next operation of a decode
//! step usually follows within microseconds, then sleep on a condition variable so an idle
//! worker costs no CPU. A panic inside a job is caught and re-raised on the caller.

use std::any::Any;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Lifetime-erased pointer to the current job; valid while `pending > 0`.
    job: UnsafeCell<Option<*const Job>>,
    epoch: AtomicU64,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only by the thread inside `run` while no worker reads it (all are
// waiting for the next epoch), and read by workers only between that epoch's publication and
// their decrement of `pending`, during which `run` does not return.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
}

/// Iterations a worker spins waiting for a job before it sleeps (tens of microseconds).
const SPIN_ITERATIONS: u32 = 1 << 16;

impl ThreadPool {
    /// A pool of `num_threads` threads including the caller of `run` (at least 1).
    pub fn new(num_threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            panic: Mutex::new(None),
        });
        let workers = (1..num_threads.max(1))
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("kiln-compute-{index}"))
                    .spawn(move || worker_loop(&shared, index))
                    .expect("spawning a compute thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    pub fn num_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `job(thread_index)` once on each thread, `0..num_threads()`, and waits for all.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            job(0);
            return;
        }
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: see `Shared`; the pointer outlives its use because we wait for `pending == 0`.
        unsafe {
            let erased: *const Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(job);
            *shared.job.get() = Some(erased);
        }
        shared.pending.store(self.workers.len(), Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        while shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if let Err(payload) = own {
            std::panic::resume_unwind(payload);
        }
        if let Some(payload) = shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(payload);
        }
    }

    /// Splits `0..len` into one contiguous range per thread, each a multiple of `granule`
    /// long (except the last), and calls `job(range)` for the non-empty ones.
    pub fn for_ranges(&self, len: usize, granule: usize, job: &(dyn Fn(Range<usize>) + Sync)) {
        let n = self.num_threads();
        if n == 1 || len <= granule {
            if len > 0 {
                job(0..len);
            }
            return;
        }
        self.run(&|t| {
            let r = split_range(len, granule, n, t);
            if !r.is_empty() {
                job(r);
            }
        });
    }
}

/// The `t`-th of `n` near-equal contiguous parts of `0..len`, cut at multiples of `granule`.
pub fn split_range(len: usize, granule: usize, n: usize, t: usize) -> Range<usize> {
    let granule = granule.max(1);
    let units = len.div_ceil(granule);
    let start = (units * t / n * granule).min(len);
    let end = (units * (t + 1) / n * granule).min(len);
    start..end
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        while shared.epoch.load(Ordering::Acquire) == seen && !shared.stop.load(Ordering::Acquire) {
            if spins < SPIN_ITERATIONS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            while shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        seen = shared.epoch.load(Ordering::Acquire);
        // SAFETY: the epoch changed, so `run` has published a job and waits for us.
        let job = unsafe { (*shared.job.get()).expect("a job is published with each epoch") };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(index) }));
        if let Err(payload) = result {
            *shared.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer that may be shared with pool threads writing disjoint parts of a buffer.
#[derive(Clone, Copy)]
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(slice: &mut [T]) -> SharedMut<T> {
        SharedMut { ptr: slice.as_mut_ptr(), len: slice.len() }
    }

    /// The start of the slice, for kernels that write through raw pointers under the same
    /// rules as `slice`.
    pub fn as_ptr(&self) -> *mut T {
        self.ptr
    }

    /// The part `range` of the slice; panics when it reaches past the end.
    ///
    /// # Safety
    /// No two threads may hold overlapping ranges at once, and the slice this pointer was
    /// made from must outlive the returned borrow.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "range {range:?} outside a slice of {}", self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let count = AtomicUsize::new(0);
            let mask = AtomicUsize::new(0);
            pool.run(&|t| {
                count.fetch_add(1, Ordering::Relaxed);
                mask.fetch_or(1 << t, Ordering::Relaxed);
            });
            assert_eq!(count.load(Ordering::Relaxed), 3);
            assert_eq!(mask.load(Ordering::Relaxed), 0b111);
        }
    }

    #[test]
    fn ranges_cover_everything_once() {
        for len in [0usize, 1, 5, 31, 32, 33, 1000] {
            for n in 1..5 {
                let mut covered = vec![0u8; len];
                for t in 0..n {
                    for i in split_range(len, 8, n, t) {
                        covered[i] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "len {len} n {n}");
            }
        }
    }

    #[test]
    fn panic_in_worker_reaches_caller_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|t| {
                if t == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn sleeping_workers_wake_for_new_jobs() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
