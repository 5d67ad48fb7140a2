//! The threads jobs run on, kept and reused: a thread that finished its job waits up to [`IDLE`]
//! for the next one before it exits, so a node running many short jobs does not start a thread
//! for each. A job never waits behind another: when no thread is waiting, one is started.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a thread with no job waits for one before it exits.
pub const IDLE: Duration = Duration::from_secs(30);

type Task = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
pub struct Workers {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    tasks: VecDeque<Task>,
    /// Threads waiting for a task.
    idle: usize,
    /// Threads alive.
    threads: usize,
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `task` on a waiting thread, or on a new one when none is waiting.
    pub fn run(self: &Arc<Self>, task: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut s = self.lock();
        s.tasks.push_back(Box::new(task));
        if s.tasks.len() > s.idle {
            let workers = self.clone();
            let started = std::thread::Builder::new().name("vmgrid-job".into()).spawn(move || workers.work());
            if let Err(e) = started {
                s.tasks.pop_back();
                return Err(e);
            }
            s.threads += 1;
        }
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    fn work(&self) {
        loop {
            let task = {
                let mut s = self.lock();
                loop {
                    if let Some(t) = s.tasks.pop_front() {
                        break t;
                    }
                    s.idle += 1;
                    let (g, waited) = self.ready.wait_timeout(s, IDLE).unwrap_or_else(|p| p.into_inner());
                    s = g;
                    s.idle -= 1;
                    if waited.timed_out() && s.tasks.is_empty() {
                        s.threads -= 1;
                        return;
                    }
                }
            };
            task();
        }
    }

    /// Threads alive (running a job or waiting for one).
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.lock().threads
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn one_job_after_another_runs_on_the_same_thread() {
        let w = Arc::new(Workers::default());
        let (tx, rx) = mpsc::channel();
        let mut ids = HashSet::new();
        for _ in 0..100 {
            let tx = tx.clone();
            w.run(move || tx.send(std::thread::current().id()).unwrap()).unwrap();
            ids.insert(rx.recv_timeout(Duration::from_secs(10)).unwrap());
            // Once the job's thread waits again (it sent its answer just before), the next job
            // goes to it.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while w.lock().idle == 0 {
                assert!(std::time::Instant::now() < deadline, "the thread never came back for more");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(ids.len(), 1, "one thread for 100 jobs run one at a time");
        assert_eq!(w.threads(), 1);
    }

    #[test]
    fn jobs_at_once_each_get_a_thread_and_none_waits_behind_another() {
        let w = Arc::new(Workers::default());
        let (started, seen) = mpsc::channel();
        let (go, wait) = mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        for _ in 0..8 {
            let (started, wait) = (started.clone(), wait.clone());
            w.run(move || {
                started.send(std::thread::current().id()).unwrap();
                // Blocks until released: a job queued behind this one would never start.
                let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(20));
            })
            .unwrap();
        }
        let ids: HashSet<_> = (0..8).map(|_| seen.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        assert_eq!(ids.len(), 8, "eight jobs at once run on eight threads");
        drop(go);
    }
}
