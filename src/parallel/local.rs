//! All ranks in one process on one device: exchanges hand tensors over through shared memory.
//! Runs the sharded code paths exactly as with NCCL (same shards, same token orders) on the CPU
//! and on a single GPU, which is how the tests check them against the single-rank results.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};

use super::{Health, Pending, Span, Transport};
use crate::error::CandiffError;

/// One exchange: what each member deposited (buffer and its pieces per member), and how many
/// members have taken their share.
#[derive(Default)]
struct Slot {
    deposits: HashMap<usize, (Tensor, Vec<Vec<Span>>)>,
    taken: usize,
}

/// Exchanges in flight, keyed by (members, sequence number of the exchange within that group).
#[derive(Default)]
struct Board {
    slots: Mutex<HashMap<(Vec<usize>, u64), Slot>>,
    changed: Condvar,
}

pub struct LocalTransport {
    rank: usize,
    world: usize,
    board: Arc<Board>,
    /// Exchanges this rank has made per group (every member counts the same calls).
    calls: Mutex<HashMap<Vec<usize>, u64>>,
    health: Arc<Health>,
    timeout: Duration,
}

/// How often a waiting rank re-checks its peers' health.
const POLL: Duration = Duration::from_millis(50);

impl LocalTransport {
    pub fn create(n: usize, health: Arc<Health>, timeout: Duration) -> Vec<Self> {
        let board = Arc::new(Board::default());
        (0..n)
            .map(|rank| Self {
                rank,
                world: n,
                board: board.clone(),
                calls: Mutex::default(),
                health: health.clone(),
                timeout,
            })
            .collect()
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Finishes at once: the hand-over is through shared memory, nothing runs beside it.
    fn exchange_start(
        &self,
        members: &[usize],
        send: &Tensor,
        sends: &[Vec<Span>],
        recv_len: usize,
        recvs: &[Vec<Span>],
    ) -> Result<(Tensor, Pending)> {
        super::check_spans(sends, send.elem_count(), recvs, recv_len)?;
        let me = members
            .iter()
            .position(|&m| m == self.rank)
            .ok_or_else(|| candle_core::Error::Msg(format!("rank {} is not in {members:?}", self.rank)))?;
        let seq = {
            let mut calls = self.calls.lock().expect("calls");
            let c = calls.entry(members.to_vec()).or_insert(0);
            *c += 1;
            *c
        };
        let key = (members.to_vec(), seq);
        self.health.beat(self.rank);
        let start = Instant::now();
        let mut slots = self.board.slots.lock().expect("board");
        slots.entry(key.clone()).or_default().deposits.insert(self.rank, (send.clone(), sends.to_vec()));
        self.board.changed.notify_all();
        loop {
            if slots.get(&key).is_some_and(|s| s.deposits.len() == members.len()) {
                break;
            }
            if let Some(e) = self.health.peer_error(self.rank) {
                return Err(e);
            }
            if start.elapsed() > self.timeout {
                let missing: Vec<usize> = members
                    .iter()
                    .copied()
                    .filter(|m| !slots.get(&key).is_some_and(|s| s.deposits.contains_key(m)))
                    .collect();
                // The run failed because of the ranks that never came: blame the first of them.
                let why = format!("never reached an exchange that rank {} waited {:?} at", self.rank, self.timeout);
                self.health.fail(missing.first().copied().unwrap_or(self.rank), why.clone());
                return Err(CandiffError::Parallel(format!(
                    "rank {}: waited {:?} for ranks {missing:?}",
                    self.rank, self.timeout
                ))
                .into());
            }
            slots = self.board.changed.wait_timeout(slots, POLL).expect("board").0;
        }
        let slot = slots.get_mut(&key).expect("present");
        // (where it lands, the piece), sorted into the result's order.
        let mut pieces: Vec<(usize, Tensor)> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let (buf, spans) = &slot.deposits[m];
            let (got, want) = (&spans[me], &recvs[i]);
            let lens = |v: &[Span]| v.iter().map(|s| s.1).collect::<Vec<_>>();
            if lens(got) != lens(want) {
                candle_core::bail!(
                    "rank {}: expected pieces of {:?} elements from rank {m}, it sent {:?}",
                    self.rank,
                    lens(want),
                    lens(got)
                );
            }
            for (&(at, len), &(to, _)) in got.iter().zip(want) {
                if len > 0 {
                    pieces.push((to, buf.narrow(0, at, len)?));
                }
            }
        }
        pieces.sort_by_key(|p| p.0);
        let pieces: Vec<Tensor> = pieces.into_iter().map(|p| p.1).collect();
        self.health.beat(self.rank);
        slot.taken += 1;
        if slot.taken == members.len() {
            slots.remove(&key);
        }
        drop(slots);
        let out = if pieces.is_empty() { send.narrow(0, 0, 0)? } else { Tensor::cat(&pieces, 0)? };
        Ok((out, Pending::done()))
    }

    fn fence(&self) -> Result<()> {
        self.health.beat(self.rank);
        match self.health.peer_error(self.rank) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
