//! Long work's progress as metrics (issue 15): how many scrubs, rebuilds and migrations run on
//! this server now (`stripelock_work_running{work=...}`), and the bytes each has done since
//! start (`stripelock_work_bytes_total{work=...}`), so an operator sees a scrub move and at
//! what rate (`rate()` of the bytes) without the CLI that started it.

/// The kinds of long work a server carries out for a client.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    Scrub,
    Rebuild,
    Migrate,
}

impl Work {
    fn label(self) -> &'static str {
        match self {
            Work::Scrub => "scrub",
            Work::Rebuild => "rebuild",
            Work::Migrate => "migrate",
        }
    }
}

/// One piece of work running: counted in the gauge while it lives.
#[derive(Debug)]
pub struct Running(Work);

impl Running {
    pub fn start(work: Work) -> Running {
        metrics::gauge!("stripelock_work_running", "work" => work.label()).increment(1.0);
        Running(work)
    }

    /// `bytes` more done.
    pub fn done(&self, bytes: u64) {
        metrics::counter!("stripelock_work_bytes_total", "work" => self.0.label()).increment(bytes);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics::gauge!("stripelock_work_running", "work" => self.0.label()).decrement(1.0);
    }
}
