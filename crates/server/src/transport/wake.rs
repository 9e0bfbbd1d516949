//! A waker of its own for one thing a task waits on among several, so that the task can tell what
//! woke it and poll only that.
//!
//! A connection's task is woken for every delivery. Without this, each wake would also poll
//! everything else the task waits on (the socket's read side, the shutdown signal, the heartbeat
//! and token timers), and each such poll re-registers a waker and finds nothing: on a chat
//! delivery that cost more than writing the delivery. With a [`WakeFlag`], the other sources are
//! polled with the flag's waker, which marks the flag and wakes the task; the task polls them again
//! only once the flag is marked.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Marked when what was polled with [`WakeFlag::waker`] woke (and at first); it wakes the task
/// that last called [`WakeFlag::take`].
pub(crate) struct WakeFlag {
    shared: Arc<Shared>,
    /// `shared` as a waker, made once.
    waker: Waker,
}

struct Shared {
    marked: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.marked.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeFlag {
    /// A marked flag: what it guards is polled at the first turn.
    pub(crate) fn new() -> Self {
        let shared = Arc::new(Shared { marked: AtomicBool::new(true), task: AtomicWaker::new() });
        Self { waker: Waker::from(shared.clone()), shared }
    }

    /// Marks it: poll what it guards at the next turn, whatever happened.
    pub(crate) fn mark(&self) {
        self.shared.marked.store(true, Ordering::Release);
    }

    /// True once (then cleared) when what it guards should be polled; the task behind `cx` is the
    /// one woken next time.
    pub(crate) fn take(&self, cx: &Context<'_>) -> bool {
        // The waker first, the flag after: a wake in between marks the flag, so it is not lost.
        // (Registered on every call: waking an `AtomicWaker` takes its waker out.)
        self.shared.task.register(cx.waker());
        // Cleared before the caller polls, so a wake during that poll is not lost.
        self.shared.marked.swap(false, Ordering::AcqRel)
    }

    /// The waker to poll what it guards with.
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }
}

/// A future polled only when its own waker fired (or at first): a cheap `Pending` otherwise.
pub(crate) struct Gated<F> {
    future: Pin<Box<F>>,
    flag: WakeFlag,
}

impl<F: Future> Gated<F> {
    pub(crate) fn new(future: F) -> Self {
        Self { future: Box::pin(future), flag: WakeFlag::new() }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.flag.take(cx) {
            return Poll::Pending;
        }
        this.future.as_mut().poll(&mut Context::from_waker(this.flag.waker()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_the_inner_future_only_after_its_own_waker_fired() {
        let (polls, ready, waker) = (Arc::default(), Arc::new(AtomicBool::new(false)), Arc::default());
        let probe = Probe { polls: Arc::clone(&polls), ready: Arc::clone(&ready), waker: Arc::clone(&waker) };
        let mut gated = Box::pin(Gated::new(probe));
        let task = Arc::new(CountWakes(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled at first");
        // The task woken for something else: the inner future is not polled again.
        for _ in 0..3 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // Its own waker fires: the task is woken, and the next poll reaches it.
        ready.store(true, Ordering::SeqCst);
        waker.lock().unwrap().take().expect("registered a waker").wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_task_woken_is_the_one_that_took_last() {
        let flag = WakeFlag::new();
        let (first, second) = (Arc::new(CountWakes(AtomicUsize::new(0))), Arc::new(CountWakes(AtomicUsize::new(0))));
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        assert!(flag.take(&Context::from_waker(&first_waker)));
        flag.waker().wake_by_ref();
        assert_eq!((first.0.load(Ordering::SeqCst), second.0.load(Ordering::SeqCst)), (1, 0));
        // The connection moved to another task (or its waker changed): that one is woken now.
        assert!(flag.take(&Context::from_waker(&second_waker)));
        assert!(!flag.take(&Context::from_waker(&second_waker)));
        flag.waker().wake_by_ref();
        assert_eq!((first.0.load(Ordering::SeqCst), second.0.load(Ordering::SeqCst)), (1, 1));
        // Woken again and again by the same task's waker, registered once: every wake reaches it.
        for expected in 2..5 {
            assert!(flag.take(&Context::from_waker(&second_waker)));
            assert!(!flag.take(&Context::from_waker(&second_waker)));
            flag.waker().wake_by_ref();
            assert_eq!(second.0.load(Ordering::SeqCst), expected);
        }
    }

    #[test]
    fn a_marked_flag_is_taken_once() {
        let flag = WakeFlag::new();
        let cx = Context::from_waker(Waker::noop());
        assert!(flag.take(&cx), "marked at first");
        assert!(!flag.take(&cx));
        flag.mark();
        assert!(flag.take(&cx));
        assert!(!flag.take(&cx));
        flag.waker().wake_by_ref();
        assert!(flag.take(&cx));
    }
}
