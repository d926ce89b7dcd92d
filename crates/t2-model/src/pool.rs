//! The threads that run a step's kernels. A decode step is a few hundred short parallel loops (one per
//! projection, ~30 µs each on SmolLM2), separated by a few microseconds of serial work. Handing each loop to
//! rayon from the model thread costs a sleep and a wake-up per loop (the caller blocks on a latch, idle
//! workers park), which in the VMs here came to ~75 µs per call: half of a batch-1 decode step. So the
//! kernels run on this pool instead: the calling thread takes part, and the other threads spin for a
//! short while after each loop, ready for the next one, then sleep until there is work.
//!
//! A loop's tasks are claimed one at a time from a shared counter. Which thread runs a task never changes
//! what the task computes, so results do not depend on the threads either.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps spinning for the next loop before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

struct Shared {
    /// The loop being run, or null. Points into the caller's stack: see `run` for why that is sound.
    job: AtomicPtr<Job<'static>>,
    /// Raised with every loop published, so a worker tells a new loop from the last one even when both
    /// sit at the same stack address.
    seq: AtomicUsize,
    /// Workers between seeing `job` and letting go of it.
    active: AtomicUsize,
    sleepers: AtomicUsize,
    wake: (Mutex<()>, Condvar),
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One loop at a time; a caller that finds the pool busy runs its loop alone.
    busy: Mutex<()>,
}

impl Pool {
    /// The process's pool, with as many threads (the caller included) as rayon's global pool.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1)))
    }

    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            seq: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            wake: (Mutex::new(()), Condvar::new()),
        });
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("t2-kernel-{i}"))
                .spawn(move || worker(&s))
                .expect("spawning a kernel thread");
        }
        Self {
            shared,
            threads,
            busy: Mutex::new(()),
        }
    }

    /// Threads that run a loop, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs f(0), …, f(tasks - 1), spread over the pool, and returns when all have run.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) if tasks > 1 && self.threads > 1 => g,
            _ => return (0..tasks).for_each(f),
        };
        let job = Job {
            f,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        };
        let s = &*self.shared;
        // SAFETY (lifetime): `job` lives on this stack frame, and this function does not return before
        // the pointer is withdrawn and no worker holds it (`active` is 0 after the swap below); a worker
        // only dereferences it between raising `active` and seeing it still published.
        s.job.store(&job as *const Job as *mut Job<'static>, SeqCst);
        s.seq.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.1.notify_all();
        }
        work(&job);
        while job.done.load(SeqCst) < tasks {
            std::hint::spin_loop();
        }
        s.job.store(std::ptr::null_mut(), SeqCst);
        while s.active.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        drop(guard);
    }

    /// f(i, chunk i) for the chunks of `len` elements of `data` (the last may be shorter), spread over the
    /// pool.
    pub fn for_chunks_mut<T: Send>(
        &self,
        data: &mut [T],
        len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let (total, len) = (data.len(), len.max(1));
        let base = SendPtr(data.as_mut_ptr());
        self.run(total.div_ceil(len), &|i| {
            let start = i * len;
            // SAFETY: chunk i is [start, start + len) ∩ data, disjoint from every other chunk, and `data`
            // is borrowed mutably until every task has run.
            let chunk = unsafe {
                std::slice::from_raw_parts_mut(base.get().add(start), len.min(total - start))
            };
            f(i, chunk)
        });
    }
}

impl Pool {
    /// f(i, chunk i of `a`, chunk i of `b`) for the chunks of `len` elements of two equally long slices,
    /// spread over the pool.
    pub fn for_chunk_pairs_mut<T: Send>(
        &self,
        a: &mut [T],
        b: &mut [T],
        len: usize,
        f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
    ) {
        assert_eq!(a.len(), b.len(), "chunk pairs of unequal slices");
        let (total, len) = (a.len(), len.max(1));
        let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        self.run(total.div_ceil(len), &|i| {
            let (start, n) = (i * len, len.min(total - i * len));
            // SAFETY: as in `for_chunks_mut`, for each of the two slices.
            let (ca, cb) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(start), n),
                    std::slice::from_raw_parts_mut(pb.get().add(start), n),
                )
            };
            f(i, ca, cb)
        });
    }
}

struct SendPtr<T>(*mut T);
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}
// SAFETY: only used to hand out disjoint chunks of a slice that is itself Send.
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn work(job: &Job<'_>) {
    loop {
        let i = job.next.fetch_add(1, SeqCst);
        if i >= job.tasks {
            return;
        }
        (job.f)(i);
        job.done.fetch_add(1, SeqCst);
    }
}

fn worker(s: &Shared) {
    let mut last = 0;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let seq = s.seq.load(SeqCst);
        let p = s.job.load(SeqCst);
        if seq == last || p.is_null() {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                if idle_since.elapsed() > SPIN {
                    sleep(s, last);
                    idle_since = Instant::now();
                } else {
                    // Let other runnable threads (rayon's, the server's) have the core.
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
            continue;
        }
        s.active.fetch_add(1, SeqCst);
        if s.seq.load(SeqCst) == seq && s.job.load(SeqCst) == p {
            // SAFETY: published and counted in `active`: the caller keeps it alive (see `Pool::run`).
            work(unsafe { &*p });
            last = seq;
        }
        s.active.fetch_sub(1, SeqCst);
        idle_since = Instant::now();
    }
}

fn sleep(s: &Shared, last: usize) {
    let (m, cv) = &s.wake;
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    s.sleepers.fetch_add(1, SeqCst);
    while s.seq.load(SeqCst) == last || s.job.load(SeqCst).is_null() {
        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    s.sleepers.fetch_sub(1, SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_whoever_calls() {
        let pool = Pool::new(3);
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        // Concurrent callers: one gets the pool, the others run their loops alone.
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for round in 0..50 {
                        pool.run(hits.len(), &|i| {
                            hits[i].fetch_add(1, SeqCst);
                        });
                        if round == 25 {
                            // Long enough for the workers to go to sleep and be woken.
                            std::thread::sleep(SPIN * 2);
                        }
                    }
                });
            }
        });
        assert!(hits.iter().all(|h| h.load(SeqCst) == 150));
    }
}
