//! The threads of a forward pass's parallel sections. A decode step of a
//! small model is a few hundred short parallel sections (each matmul, each
//! layer's attention), a few microseconds each; rayon's workers fall asleep
//! between them and are woken through the kernel every time, which took
//! about a tenth of SmolLM2's decode. These workers spin between sections
//! instead, as llama.cpp's do, and sleep only after a millisecond with
//! nothing to do. The calling thread takes tasks too, so `--threads N` runs
//! N - 1 workers.
//!
//! A section called from inside a section, or while another thread's
//! section holds the pool, runs on rayon instead: nothing waits on the pool.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(1);

/// A section's work: `tasks` calls of `work`, one per task index.
#[derive(Clone, Copy)]
struct Job {
    work: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Pool {
    workers: usize,
    /// Held by the thread whose section the workers run.
    owner: Mutex<()>,
    /// Bumped for every section; workers run a section once per epoch.
    epoch: AtomicUsize,
    job: UnsafeCell<Job>,
    /// The next task index to take.
    next: AtomicUsize,
    /// Workers that have not finished the current section.
    unfinished: AtomicUsize,
    /// Workers asleep (or about to be), and what wakes them.
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    /// The first panic of the current section's tasks.
    panicked: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is written only by the owner, before the epoch is bumped
// and while no worker is inside a section (unfinished is 0), and read by
// workers only after they see the bump; the closure it points to is Sync
// and outlives the section (the owner waits for every worker).
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

thread_local! {
    /// Whether this thread is running a section's tasks.
    static IN_SECTION: Cell<bool> = const { Cell::new(false) };
}

fn noop(_: usize) {}

/// One round of a spin wait. Every 256th round yields the core, so a
/// thread that has work (a descheduled worker, the HTTP runtime) gets it
/// when cores are fewer than runnable threads.
fn pause(spins: u32) {
    if spins.is_multiple_of(256) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

impl Pool {
    fn start(threads: usize) -> &'static Pool {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers: threads.saturating_sub(1),
            owner: Mutex::new(()),
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                work: &noop,
                tasks: 0,
            }),
            next: AtomicUsize::new(0),
            unfinished: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            panicked: Mutex::new(None),
        }));
        for index in 0..pool.workers {
            std::thread::Builder::new()
                .name(format!("qpai-forward-{index}"))
                .spawn(move || pool.work())
                .expect("spawning a forward-pass thread");
        }
        pool
    }

    /// Takes tasks of the current section until none is left. A task that
    /// panics is kept for the owner to resume once the section is over.
    fn take_tasks(&self, job: Job) {
        IN_SECTION.with(|flag| flag.set(true));
        loop {
            let task = self.next.fetch_add(1, Ordering::Relaxed);
            if task >= job.tasks {
                break;
            }
            // SAFETY: see `Sync for Pool`: the closure lives until every
            // worker has finished the section.
            let run = std::panic::AssertUnwindSafe(|| unsafe { (*job.work)(task) });
            if let Err(payload) = std::panic::catch_unwind(run) {
                let mut panicked = self.panicked.lock().unwrap_or_else(|e| e.into_inner());
                panicked.get_or_insert(payload);
            }
        }
        IN_SECTION.with(|flag| flag.set(false));
    }

    fn work(&self) {
        let mut seen = 0;
        loop {
            seen = self.wait_for_section(seen);
            // SAFETY: written before the epoch this thread has just seen.
            let job = unsafe { *self.job.get() };
            self.take_tasks(job);
            self.unfinished.fetch_sub(1, Ordering::Release);
        }
    }

    /// Spins, then sleeps, until the epoch moves past `seen`; returns it.
    fn wait_for_section(&self, seen: usize) -> usize {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            if epoch != seen {
                return epoch;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || started.elapsed() < SPIN {
                pause(spins);
                continue;
            }
            // Counted as a sleeper before the last look at the epoch, so
            // the owner either sees the count and wakes it, or bumped the
            // epoch before that look (both sides SeqCst).
            let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            while self.epoch.load(Ordering::SeqCst) == seen {
                guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            return self.epoch.load(Ordering::Acquire);
        }
    }

    /// Runs `work` for every task on the workers and this thread; false
    /// (and nothing run) when another thread's section holds the pool.
    fn run(&self, tasks: usize, work: &(dyn Fn(usize) + Sync)) -> bool {
        let _owner = match self.owner.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => return false,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
        };
        // SAFETY: the lifetime is erased only for the section: this function
        // returns after every worker has finished it (unfinished is 0).
        let work: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(work) };
        // SAFETY: no worker is in a section (the last one ended with
        // unfinished at 0) and none reads the job before the bump below.
        unsafe { *self.job.get() = Job { work, tasks } };
        self.next.store(0, Ordering::Relaxed);
        self.unfinished.store(self.workers, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        self.take_tasks(Job { work, tasks });
        let mut spins = 0u32;
        while self.unfinished.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            pause(spins);
        }
        let panicked = self
            .panicked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(payload) = panicked {
            std::panic::resume_unwind(payload);
        }
        true
    }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::start(rayon::current_num_threads()))
}

/// Calls `work(task)` for every task in `0..tasks`, in parallel, and
/// returns when all are done.
pub fn for_each_task(tasks: usize, work: impl Fn(usize) + Sync) {
    if tasks <= 1 || IN_SECTION.with(Cell::get) {
        (0..tasks).for_each(work);
        return;
    }
    let pool = pool();
    if pool.workers == 0 {
        (0..tasks).for_each(work);
    } else if !pool.run(tasks, &work) {
        (0..tasks).into_par_iter().for_each(&work);
    }
}

/// Calls `work(index, chunk)` for every `chunk`-long piece of `data` (the
/// last may be shorter), in parallel.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let start = SendPtr(data.as_mut_ptr());
    for_each_task(len.div_ceil(chunk), |index| {
        let from = index * chunk;
        let to = (from + chunk).min(len);
        // SAFETY: tasks get disjoint ranges inside `data`, which outlives
        // the section, and each index is run exactly once.
        let piece = unsafe { std::slice::from_raw_parts_mut(start.get().add(from), to - from) };
        work(index, piece);
    });
}

/// The start of a buffer whose disjoint parts tasks write.
struct SendPtr<T>(*mut T);
// SAFETY: tasks write disjoint parts (see `for_each_chunk_mut`).
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once, sections follow one another (also
    /// after the workers have slept), nested and concurrent sections
    /// complete, and chunks cover the data.
    #[test]
    fn every_task_runs_once_whoever_calls() {
        for round in 0..200 {
            let tasks = 1 + round % 37;
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for_each_task(tasks, |t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            if round == 100 {
                std::thread::sleep(SPIN * 5);
            }
        }
        let total = AtomicUsize::new(0);
        for_each_task(4, |_| {
            for_each_task(3, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let sum = AtomicUsize::new(0);
                    for _ in 0..100 {
                        for_each_task(8, |t| {
                            sum.fetch_add(t, Ordering::Relaxed);
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().unwrap(), 100 * 28);
        }
        let mut data = vec![0usize; 1000];
        for_each_chunk_mut(&mut data, 64, |index, piece| {
            for (i, v) in piece.iter_mut().enumerate() {
                *v = index * 64 + i;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &v)| i == v));
    }
}
