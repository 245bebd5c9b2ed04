//! One rank per GPU over NCCL (cudarc's bindings). The all-to-all is one NCCL group of
//! point-to-point sends and receives on the rank's communication stream, ordered after the
//! compute that wrote the send buffer (an event) and before the compute that reads the result
//! (an event the compute stream waits on: at once for [`Transport::all_to_all`], later for
//! [`Transport::all_to_all_start`], so compute queued in between overlaps the transfer). Every
//! NCCL call of a rank goes to that one stream, so they run in the order issued on every rank.
//! Nothing waits on the host except [`Transport::fence`], which polls both streams against the
//! run's timeout and the other ranks' health and aborts the communicator rather than hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CustomOp1, Device, Layout, Result, Shape, Tensor};
use cudarc::nccl::{result as nccl, sys};

use super::{Health, Span, Transport};
use crate::error::CandiffError;

/// How often a fencing rank polls its stream and its peers' health.
const POLL: Duration = Duration::from_micros(200);

/// An NCCL communicator handle (used by one rank thread at a time).
struct Comm(sys::ncclComm_t);
// SAFETY: NCCL communicators may be used from any thread, one thread at a time; each rank's is
// used only by its own rank thread (and aborted from it).
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

pub struct NcclTransport {
    /// `None` once aborted (by this rank or by the watchdog): later exchanges fail.
    comm: std::sync::Mutex<Option<Comm>>,
    device: CudaDevice,
    /// Where this rank's NCCL calls run (see the module's comment).
    comm_stream: Arc<cudarc::driver::CudaStream>,
    rank: usize,
    world: usize,
    health: Arc<Health>,
    timeout: Duration,
}

fn nccl_err(what: &str) -> impl Fn(nccl::NcclError) -> candle_core::Error + '_ {
    move |e| CandiffError::Parallel(format!("NCCL {what}: {e:?}")).into()
}

impl NcclTransport {
    /// Devices `0..n` and one communicator per device (initialized concurrently, as NCCL needs).
    pub fn create(n: usize, health: Arc<Health>, timeout: Duration) -> Result<Vec<(Device, Arc<dyn Transport>)>> {
        let available = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map_err(|e| CandiffError::Parallel(format!("counting GPUs: {e}")))? as usize;
        if available < n {
            return Err(CandiffError::Parallel(format!(
                "--gpus {n} needs {n} GPUs, this machine shows {available} (check CUDA_VISIBLE_DEVICES)"
            ))
            .into());
        }
        let devices = (0..n)
            .map(|i| match crate::cuda_support::cuda_device(i, true)? {
                Device::Cuda(d) => Ok(d),
                _ => unreachable!("a CUDA device"),
            })
            .collect::<Result<Vec<_>>>()?;
        let id = nccl::get_uniqueid().map_err(nccl_err("unique id"))?;
        let comms: Vec<Result<Comm>> = std::thread::scope(|s| {
            let hs: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, dev)| {
                    s.spawn(move || -> Result<Comm> {
                        dev.cuda_stream().context().bind_to_thread().map_err(candle_core::Error::wrap)?;
                        let mut comm = std::mem::MaybeUninit::uninit();
                        // SAFETY: every rank joins with the same id and world size.
                        let comm = unsafe {
                            nccl::comm_init_rank(comm.as_mut_ptr(), n as i32, id, rank as i32)
                                .map_err(nccl_err("communicator init"))?;
                            Comm(comm.assume_init())
                        };
                        connect_peers(&comm, dev, rank, n)?;
                        Ok(comm)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("NCCL init thread")).collect()
        });
        let mut out = Vec::with_capacity(n);
        for (rank, (comm, dev)) in comms.into_iter().zip(devices).enumerate() {
            // The highest priority: when the transfers overlap a GEMM, the block scheduler hands
            // NCCL's blocks the first free multiprocessors instead of queueing them behind the
            // GEMM's remaining waves.
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
            let (_, greatest) =
                cudarc::driver::result::stream::get_priority_range().map_err(candle_core::Error::wrap)?;
            let comm_stream = ctx.new_stream_with_priority(greatest).map_err(candle_core::Error::wrap)?;
            let t = NcclTransport {
                comm: std::sync::Mutex::new(Some(comm?)),
                device: dev.clone(),
                comm_stream,
                rank,
                world: n,
                health: health.clone(),
                timeout,
            };
            out.push((Device::Cuda(dev), Arc::new(t) as Arc<dyn Transport>));
        }
        Ok(out)
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Option<Comm>> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One NCCL group of point-to-point transfers on `stream`: to and from each peer `peers[i]`
/// (`None`: skipped; a rank may be its own peer), the pieces `sends[i]` / `recvs[i]` as (device address, bytes), in
/// order (the k-th send to a peer meets that peer's k-th receive from this rank); empty ones
/// skipped.
///
/// # Safety
/// Every (address, bytes) must lie in a device buffer that stays alive until the stream has run
/// the transfers.
unsafe fn transfer(
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
    peers: &[Option<i32>],
    sends: &[Vec<(u64, usize)>],
    recvs: &[Vec<(u64, usize)>],
    what: &str,
) -> Result<()> {
    nccl::group_start().map_err(nccl_err("group start"))?;
    let mut res = Ok(());
    for (i, peer) in peers.iter().enumerate() {
        let Some(peer) = *peer else { continue };
        // Bytes are moved as u8 whatever the element type.
        for &(sp, sn) in &sends[i] {
            if sn > 0 && res.is_ok() {
                res = nccl::send(sp as *const _, sn, sys::ncclDataType_t::ncclUint8, peer, comm, stream).map(|_| ());
            }
        }
        for &(rp, rn) in &recvs[i] {
            if rn > 0 && res.is_ok() {
                res = nccl::recv(rp as *mut _, rn, sys::ncclDataType_t::ncclUint8, peer, comm, stream).map(|_| ());
            }
        }
    }
    // The group is closed whatever happened inside it.
    let end = nccl::group_end().map(|_| ());
    res.and(end).map_err(nccl_err(what))
}

/// Bytes exchanged with each peer when the communicator is made.
const CONNECT_BYTES: usize = 64;

/// One small exchange with every peer while all ranks are alive: NCCL sets up point-to-point
/// connections on first use, blocking the host until the peer answers, so doing it here keeps
/// later exchanges from blocking on the host (where a lost peer could not be noticed).
fn connect_peers(comm: &Comm, dev: &CudaDevice, rank: usize, n: usize) -> Result<()> {
    let stream = dev.cuda_stream();
    let send = stream.alloc_zeros::<u8>(CONNECT_BYTES * n).map_err(candle_core::Error::wrap)?;
    let mut recv = stream.alloc_zeros::<u8>(CONNECT_BYTES * n).map_err(candle_core::Error::wrap)?;
    {
        let (sp, _g1) = send.device_ptr(&stream);
        let (rp, _g2) = recv.device_ptr_mut(&stream);
        let peers: Vec<Option<i32>> = (0..n).map(|p| (p != rank).then_some(p as i32)).collect();
        let at = |base: u64| -> Vec<Vec<(u64, usize)>> {
            (0..n).map(|p| vec![(base + (p * CONNECT_BYTES) as u64, CONNECT_BYTES)]).collect()
        };
        // SAFETY: both buffers hold CONNECT_BYTES per peer and live until the synchronize below.
        unsafe { transfer(comm.0, stream.cu_stream() as _, &peers, &at(sp), &at(rp), "connecting to peers")? };
    }
    stream.synchronize().map_err(candle_core::Error::wrap)
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        if let Some(c) = self.comm().take() {
            // SAFETY: nothing uses the communicator after its transport is dropped.
            unsafe {
                let _ = nccl::comm_destroy(c.0);
            }
        }
    }
}

/// The exchange as a Candle op: output allocated on the rank's stream, the NCCL group enqueued
/// there.
struct AllToAll<'a> {
    t: &'a NcclTransport,
    comm: sys::ncclComm_t,
    members: &'a [usize],
    sends: &'a [Vec<Span>],
    recv_len: usize,
    recvs: &'a [Vec<Span>],
    /// Recorded on the communication stream after the transfers.
    done: std::sync::Mutex<Option<cudarc::driver::CudaEvent>>,
}

impl AllToAll<'_> {
    fn run<T: candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        src: &cudarc::driver::CudaSlice<T>,
        offset: usize,
        dev: &CudaDevice,
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        let stream = dev.cuda_stream();
        // SAFETY: every element is written: the caller's receive pieces cover the buffer, each
        // filled by a receive (this rank's own pieces too).
        let mut out = unsafe { stream.alloc::<T>(self.recv_len) }.map_err(candle_core::Error::wrap)?;
        let size = std::mem::size_of::<T>();
        // The transfers wait for what the compute stream has queued (the send buffer, the
        // allocation of `out`).
        let cs = &self.t.comm_stream;
        cs.join(&stream).map_err(candle_core::Error::wrap)?;
        let timed = crate::profile::enabled();
        let timing = || cs.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT));
        let start = if timed { Some(timing().map_err(candle_core::Error::wrap)?) } else { None };
        {
            let (sp, _g1) = src.device_ptr(cs);
            let (rp, _g2) = out.device_ptr_mut(cs);
            // This rank's own pieces too: NCCL copies them on the communication stream, where a
            // device copy per piece would be a launch each on the compute stream.
            let peers: Vec<Option<i32>> = self.members.iter().map(|&p| Some(p as i32)).collect();
            let bytes = |base: u64, spans: &[Vec<Span>]| -> Vec<Vec<(u64, usize)>> {
                spans.iter().map(|v| v.iter().map(|&(a, c)| (base + (a * size) as u64, c * size)).collect()).collect()
            };
            let sends = bytes(sp + (offset * size) as u64, self.sends);
            let recvs = bytes(rp, self.recvs);
            // SAFETY: pieces lie within the buffers (checked by `check_spans`); the buffers'
            // stream-ordered lifetimes cover the transfers.
            unsafe { transfer(self.comm, cs.cu_stream() as _, &peers, &sends, &recvs, "all-to-all")? };
        }
        if let Some(start) = start {
            crate::profile::record_transfer(start, timing().map_err(candle_core::Error::wrap)?);
        }
        let done = cs.record_event(None).map_err(candle_core::Error::wrap)?;
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(done);
        Ok(out)
    }
}

impl CustomOp1 for AllToAll<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-to-all"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL transport exchanges GPU tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-to-all input must be contiguous".into()))?;
        super::check_spans(self.sends, end - start, self.recvs, self.recv_len)?;
        let dev = s.device().clone();
        let slice = match &s.slice {
            CudaStorageSlice::BF16(x) => CudaStorageSlice::BF16(self.run(x, start, &dev)?),
            CudaStorageSlice::F16(x) => CudaStorageSlice::F16(self.run(x, start, &dev)?),
            CudaStorageSlice::F32(x) => CudaStorageSlice::F32(self.run(x, start, &dev)?),
            _ => candle_core::bail!("all-to-all takes bf16, f16 or f32 tensors, found {:?}", s.dtype()),
        };
        Ok((CudaStorage { slice, device: dev }, Shape::from(self.recv_len)))
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn exchange_start(
        &self,
        members: &[usize],
        send: &Tensor,
        sends: &[Vec<Span>],
        recv_len: usize,
        recvs: &[Vec<Span>],
    ) -> Result<(Tensor, super::Pending)> {
        self.health.beat(self.rank);
        if let Some(e) = self.health.peer_error(self.rank) {
            self.abort();
            return Err(e);
        }
        let send = send.contiguous()?;
        // Held while enqueuing, so the watchdog cannot abort the communicator under the call.
        let guard = self.comm();
        let comm = guard
            .as_ref()
            .ok_or_else(|| CandiffError::Parallel(format!("rank {}: communication was aborted", self.rank)))?
            .0;
        let op = AllToAll { t: self, comm, members, sends, recv_len, recvs, done: Default::default() };
        let out = send.apply_op1_no_bwd(&op)?;
        drop(guard);
        let done = op.done.into_inner().unwrap_or_else(|p| p.into_inner());
        let compute = self.device.cuda_stream();
        // The buffers stay alive until the compute stream waits for the transfers: whatever is
        // released after that wait is released in stream order behind them.
        let keep = (send, out.clone());
        Ok((
            out,
            super::Pending::new(move || {
                if let Some(e) = done {
                    compute.wait(&e).map_err(candle_core::Error::wrap)?;
                }
                drop(keep);
                Ok(())
            }),
        ))
    }

    fn abort(&self) {
        // Never waits for the lock: a rank inside an NCCL call holds it (the watchdog retries,
        // and gives up on the process if that call never returns; see `launch`).
        let mut guard = match self.comm.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if let Some(c) = guard.take() {
            // SAFETY: taken out under the lock: no call is using it, none will again. Abort ends
            // the kernels of pending operations, which frees a stream waiting on a lost peer.
            unsafe {
                let _ = nccl::comm_abort(c.0);
            }
        }
    }

    fn fence(&self) -> Result<()> {
        self.health.beat(self.rank);
        let stream = self.device.cuda_stream();
        // Transfers still in flight on the communication stream count as queued work.
        stream.join(&self.comm_stream).map_err(candle_core::Error::wrap)?;
        let event = stream.record_event(None).map_err(candle_core::Error::wrap)?;
        let start = Instant::now();
        loop {
            if event.try_is_complete().map_err(candle_core::Error::wrap)? {
                // Aborted communication also lets the stream finish: its results are not valid.
                if let Some(e) = self.health.peer_error(self.rank) {
                    return Err(e);
                }
                if self.comm().is_none() {
                    return Err(CandiffError::Parallel(format!("rank {}: communication was aborted", self.rank)).into());
                }
                return Ok(());
            }
            if let Some(e) = self.health.peer_error(self.rank) {
                self.abort();
                return Err(e);
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            if let Some(c) = self.comm().as_ref() {
                // SAFETY: querying a live communicator's asynchronous error state.
                let _ = unsafe { sys::ncclCommGetAsyncError(c.0, &mut async_err) };
            }
            if async_err != sys::ncclResult_t::ncclSuccess && async_err != sys::ncclResult_t::ncclInProgress {
                let why = format!("NCCL reported {async_err:?}");
                self.health.fail(self.rank, why.clone());
                self.abort();
                return Err(CandiffError::Parallel(format!("rank {}: {why}", self.rank)).into());
            }
            if self.comm().is_none() {
                return Err(CandiffError::Parallel(format!("rank {}: communication was aborted", self.rank)).into());
            }
            if start.elapsed() > self.timeout {
                let why = format!(
                    "GPU {} waited {:?} for its peers (set a longer --parallel-timeout if steps are that slow)",
                    self.rank, self.timeout
                );
                self.health.fail(self.rank, why.clone());
                self.abort();
                return Err(CandiffError::Parallel(format!("rank {}: {why}", self.rank)).into());
            }
            std::thread::sleep(POLL);
        }
    }
}
