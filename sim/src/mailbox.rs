//! The channel from the engine to one request's HTTP handler: unbounded, one sender, one
//! receiver, a queue and a waker behind one uncontended mutex.
//!
//! A streamed token is one send and one receive, and the SSE body is polled until it is
//! pending after every write (two or three polls per token), so the handoff is on the hot
//! path. tokio's `mpsc` pays for multi-producer lock-free blocks, semaphore counts, a
//! cooperative-budget check and a waker re-registration on every pending poll (~700
//! instructions per streamed token, measured with callgrind); here a pending poll takes
//! the lock, sees an empty queue and keeps the waker it already holds.
//!
//! ```text
//! engine: Sender::send ──> [ queue | waker | sender_gone | receiver_gone ] ──> Receiver::poll_recv_many: handler
//! ```
//!
//! Dropping the receiver (the client went away) closes the channel: `is_closed` turns true,
//! which the engine reaps before its next step. Dropping the sender ends the receiver's
//! stream once the queue is empty.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

type Shared<T> = Arc<Mutex<State<T>>>;

fn lock<T>(shared: &Shared<T>) -> MutexGuard<'_, State<T>> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new channel.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared =
        Arc::new(Mutex::new(State { queue: VecDeque::new(), waker: None, sender_gone: false, receiver_gone: false }));
    (Sender(shared.clone()), Receiver(shared))
}

/// The engine's end.
pub struct Sender<T>(Shared<T>);

impl<T> Sender<T> {
    /// Queues `value` and wakes the receiver; gives `value` back if the receiver is gone.
    pub fn send(&self, value: T) -> Result<(), T> {
        let waker = {
            let mut s = lock(&self.0);
            if s.receiver_gone {
                return Err(value);
            }
            s.queue.push_back(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Whether the receiver is gone (the request's client went away).
    pub fn is_closed(&self) -> bool {
        lock(&self.0).receiver_gone
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock(&self.0);
            s.sender_gone = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").field("closed", &self.is_closed()).finish()
    }
}

/// The handler's end.
pub struct Receiver<T>(Shared<T>);

impl<T> Receiver<T> {
    /// Moves everything queued into `out`: `Ready(n)` with n > 0, `Ready(0)` once the
    /// sender is gone and the queue empty, else `Pending` (woken by the next send).
    pub fn poll_recv_many(&mut self, cx: &mut Context<'_>, out: &mut Vec<T>) -> Poll<usize> {
        let mut s = lock(&self.0);
        if !s.queue.is_empty() {
            let n = s.queue.len();
            out.extend(s.queue.drain(..));
            return Poll::Ready(n);
        }
        if s.sender_gone {
            return Poll::Ready(0);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next value; None once the sender is gone and the queue empty.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut s = lock(&self.0);
            if let Some(v) = s.queue.pop_front() {
                return Poll::Ready(Some(v));
            }
            if s.sender_gone {
                return Poll::Ready(None);
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut s = lock(&self.0);
            s.receiver_gone = true;
            s.waker = None;
            std::mem::take(&mut s.queue)
        };
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_arrive_in_order_then_none_after_the_sender_is_dropped() {
        let (tx, mut rx) = channel();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let h = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
            got
        });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        drop(tx);
        assert_eq!(h.await.unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn poll_recv_many_takes_all_waits_then_is_woken_and_ends() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = channel();
        let mut out = Vec::new();
        assert!(rx.poll_recv_many(&mut cx, &mut out).is_pending());
        tx.send('a').unwrap();
        tx.send('b').unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "one wake for the first send while waiting");
        assert_eq!(rx.poll_recv_many(&mut cx, &mut out), Poll::Ready(2));
        assert_eq!(out, vec!['a', 'b']);
        assert!(rx.poll_recv_many(&mut cx, &mut out).is_pending());
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "the sender's drop wakes");
        assert_eq!(rx.poll_recv_many(&mut cx, &mut out), Poll::Ready(0));
    }

    #[test]
    fn dropping_the_receiver_closes_the_channel() {
        let (tx, rx) = channel();
        assert!(!tx.is_closed());
        tx.send(1).unwrap();
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(2), Err(2));
    }
}
