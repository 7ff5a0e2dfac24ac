//! openraft's async runtime: tokio, with the random numbers openraft draws (election timeouts,
//! tick phases) taken from a per-thread seed that a simulation can set, so a seed replays a run.

use std::cell::Cell;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand::SeedableRng;
use rand::rngs::SmallRng;

thread_local! {
    static SEED: Cell<u64> = Cell::new(std::collections::hash_map::RandomState::new().build_hasher().finish());
}

/// Makes every later random draw of openraft on this thread follow from `seed`.
pub fn seed_thread_rng(seed: u64) {
    SEED.with(|s| s.set(seed));
}

/// splitmix64 step.
fn next_seed() -> u64 {
    SEED.with(|s| {
        let mut z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// tokio for everything but randomness.
#[derive(Debug)]
pub struct Rt(TokioRuntime);

type T = TokioRuntime;

impl AsyncRuntime for Rt {
    type JoinError = <T as AsyncRuntime>::JoinError;
    type JoinHandle<O: OptionalSend + 'static> = <T as AsyncRuntime>::JoinHandle<O>;
    type Sleep = <T as AsyncRuntime>::Sleep;
    type Instant = <T as AsyncRuntime>::Instant;
    type TimeoutError = <T as AsyncRuntime>::TimeoutError;
    type Timeout<R, F: Future<Output = R> + OptionalSend> = <T as AsyncRuntime>::Timeout<R, F>;
    type ThreadLocalRng = SmallRng;

    fn spawn<F>(future: F) -> Self::JoinHandle<F::Output>
    where
        F: Future + OptionalSend + 'static,
        F::Output: OptionalSend + 'static,
    {
        T::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        T::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        T::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        T::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        T::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        T::is_panic(join_error)
    }

    fn thread_rng() -> SmallRng {
        SmallRng::seed_from_u64(next_seed())
    }

    type Mpsc = <T as AsyncRuntime>::Mpsc;
    type Watch = <T as AsyncRuntime>::Watch;
    type Oneshot = <T as AsyncRuntime>::Oneshot;
    type Mutex<V: OptionalSend + 'static> = <T as AsyncRuntime>::Mutex<V>;

    fn new(threads: usize) -> Self {
        Rt(T::new(threads))
    }

    fn block_on<F, O>(&mut self, future: F) -> O
    where
        F: Future<Output = O>,
    {
        self.0.block_on(future)
    }
}
