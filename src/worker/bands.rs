//! Pulling the shared pool: one consumer per priority, most urgent first.
//!
//! Each priority has its own pool subject and consumer (see `Names::pool_subject_of`).
//! A worker with free slots asks the consumers in turn, most urgent first, for what
//! they hold now (`no_wait` fetches, one at a time), so it takes a less urgent task only
//! when every more urgent consumer is empty. A consumer found empty is then long-polled
//! (an outstanding pull request gets new messages the moment they are published), so an
//! idle worker waits on every priority at once at no cost per message. Rules:
//!
//! * **Strict priority with a share for the rest:** of every [`FAIR_EVERY`] rounds of
//!   asking, one starts at a less urgent priority (each in turn), so under a flood of
//!   urgent tasks each other priority still starts at least one round in forty on every
//!   worker, and never waits forever.
//! * A message a long poll delivers while no slot is free (the worker filled up from
//!   another priority meanwhile) is handed back for immediate redelivery, to whichever
//!   worker asks first; such polls expire within [`POLL_EXPIRES`].
//! * Within a priority, tasks go in publish order.
//! * On shutdown the loop stops at once; pulls still outstanding hand back (nak) what
//!   they receive until they expire.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::slots::Slots;
use super::{claim, Claimed, Ctx, MAX_CLAIMS_IN_FLIGHT};

/// How long a long poll waits on the server.
pub const POLL_EXPIRES: Duration = Duration::from_secs(2);
/// One round of asking in this many starts at a less urgent priority.
pub const FAIR_EVERY: u64 = 10;

/// What a consumer is doing for this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Band {
    /// Nothing asked: may hold messages.
    Idle,
    /// A `no_wait` fetch in flight.
    Fetching,
    /// A long poll outstanding: the consumer was empty when it was sent.
    Polling,
}

enum Event {
    Msg(Box<Message>),
    /// A pull ended: `got` of `asked` messages arrived.
    Ended {
        band: usize,
        got: usize,
        asked: usize,
        waited: bool,
    },
}

/// The order consumers are asked in, in a round: most urgent first, except that every
/// [`FAIR_EVERY`]th round starts at another priority, each in turn.
fn round_order(round: u64, bands: usize) -> Vec<usize> {
    let start = if round % FAIR_EVERY == FAIR_EVERY - 1 { 1 + (round / FAIR_EVERY) as usize % (bands - 1) } else { 0 };
    (start..bands).chain(0..start).collect()
}

/// Pulls from `bands` (most urgent first) as many messages as slots are free, claims
/// what arrives and hands granted tasks to the executor, until `cancel` fires.
pub(super) async fn pool_loop(
    ctx: Ctx,
    bands: Vec<PullConsumer>,
    slots: Slots,
    exec: mpsc::UnboundedSender<Claimed>,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut state = vec![Band::Idle; bands.len()];
    let mut rounds = 0u64;
    let mut round: Option<Vec<usize>> = None;
    let mut claims = JoinSet::new();
    let mut taken = Vec::new();
    loop {
        // Ask the next consumer of the round, when none is being asked and slots are free.
        if !state.contains(&Band::Fetching) && slots.free() > 0 {
            let order = round.get_or_insert_with(|| {
                rounds += 1;
                round_order(rounds, bands.len())
            });
            match order.iter().copied().find(|&b| state[b] == Band::Idle) {
                Some(b) => {
                    state[b] = Band::Fetching;
                    tokio::spawn(pull(bands[b].clone(), b, slots.free(), false, tx.clone()));
                }
                // Every consumer is long-polled: arrivals come by themselves.
                None => round = None,
            }
        }
        let waiting_for_slot = slots.free() == 0 && state.contains(&Band::Idle);
        let event = tokio::select! {
            // Pulls still outstanding hand back what they get from now on.
            _ = cancel.cancelled() => break,
            e = rx.recv() => e,
            _ = slots.wait_free(), if waiting_for_slot => continue,
        };
        let Some(first) = event else { break };
        // Everything that arrived meanwhile goes out in one claim.
        let mut events = vec![first];
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        for e in events {
            match e {
                Event::Msg(msg) => match slots.try_take() {
                    Some(slot) => taken.push((*msg, slot)),
                    None => {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                    }
                },
                Event::Ended { band, got, asked, waited } => {
                    state[band] = Band::Idle;
                    if got > 0 {
                        round = None;
                    }
                    // Found empty: long-poll it while slots are free, and ask the next one.
                    if !waited && got < asked && slots.free() > 0 {
                        state[band] = Band::Polling;
                        tokio::spawn(pull(bands[band].clone(), band, slots.free(), true, tx.clone()));
                    }
                }
            }
        }
        if !taken.is_empty() {
            while claims.len() >= MAX_CLAIMS_IN_FLIGHT {
                claims.join_next().await;
            }
            let (msgs, mut held): (Vec<Message>, Vec<_>) = std::mem::take(&mut taken).into_iter().unzip();
            let (ctx, exec) = (ctx.clone(), exec.clone());
            claims.spawn(async move {
                // A message keeps its slot until it is granted or given up.
                claim(&ctx, msgs, |msg, task, grant| {
                    let slot = held.pop().expect("one slot per claimed message");
                    let _ = exec.send((msg, task, grant, slot));
                })
                .await;
            });
        }
    }
    // Granted tasks of claims still in flight reach the executor (or the hand-back).
    while claims.join_next().await.is_some() {}
}

/// One pull request: a `no_wait` fetch, or a long poll (`waited`). Its messages and its
/// end are sent as events. A pull request dies with the server holding it (a consumer
/// leader lost in a NATS cluster): then neither messages nor its end arrive, so it is
/// given up a second after it expired on the server, once nothing more can come.
async fn pull(consumer: PullConsumer, band: usize, asked: usize, waited: bool, tx: mpsc::UnboundedSender<Event>) {
    let asked = asked.max(1);
    let batch = if waited {
        consumer.batch().max_messages(asked).expires(POLL_EXPIRES).messages().await
    } else {
        consumer.fetch().max_messages(asked).messages().await
    };
    let lost_after =
        tokio::time::Instant::now() + if waited { POLL_EXPIRES } else { Duration::ZERO } + Duration::from_secs(1);
    let mut got = 0;
    match batch {
        Ok(mut batch) => loop {
            let next = tokio::select! {
                m = batch.next() => m,
                _ = tokio::time::sleep_until(lost_after) => None,
            };
            match next {
                Some(Ok(msg)) => {
                    got += 1;
                    // The pool loop stopped (the worker is shutting down): another worker's.
                    if let Err(mpsc::error::SendError(Event::Msg(msg))) = tx.send(Event::Msg(Box::new(msg))) {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull ended");
                    break;
                }
                None => break,
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "pull failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = tx.send(Event::Ended { band, got, asked, waited });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_urgent_first_except_every_tenth_round_in_turn() {
        let orders: Vec<Vec<usize>> = (1..=50).map(|r| round_order(r, 5)).collect();
        let starts: Vec<usize> = orders.iter().map(|o| o[0]).collect();
        assert_eq!(starts.iter().filter(|&&s| s == 0).count(), 45);
        for band in 1..5 {
            assert!(starts.contains(&band), "band {band} never starts a round: {starts:?}");
        }
        assert!(orders.iter().all(|o| {
            let mut sorted = o.clone();
            sorted.sort();
            sorted == vec![0, 1, 2, 3, 4]
        }));
        assert_eq!(round_order(9, 5), vec![1, 2, 3, 4, 0]);
    }
}
