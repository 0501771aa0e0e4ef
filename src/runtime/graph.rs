//! CUDA graphs for fixed-shape steps: a step that is the same sequence of kernels every time
//! (same shapes, its varying inputs read from device buffers the caller rewrites) runs once
//! eagerly to create everything it creates lazily (kernel modules, cuBLAS state, candle's small
//! host→device parameter uploads, the constant tables below), is captured a second time into a
//! graph, and is then replayed with one launch per step instead of one host round per kernel.
//! A small model's training step is ~600 kernels of a few µs each behind ~10 µs of host work
//! each (candle's per-op cost): launch-bound, which the replay removes.
//!
//! What a captured step must not do (each is an error during capture, never a wrong result):
//! copy between host and device (candle refuses while capturing), upload a host value that
//! changes from step to step (it would be frozen into the graph: such values go into buffers
//! the caller writes before [`Graph::launch`]), or free a tensor it did not allocate.
use anyhow::Result;
use candle_core::{Device, Tensor, WithDType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Host data already uploaded during this capture session, by (dtype, shape, bytes).
type Memo = HashMap<(candle_core::DType, Vec<usize>, Vec<u8>), Tensor>;

thread_local! {
    static MEMO: RefCell<Option<Memo>> = const { RefCell::new(None) };
    static DISABLED: Cell<bool> = const { Cell::new(false) };
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is recording a graph now: a value written from the host at this point
/// would be frozen into it, so per-step inputs are left to the replay's writer.
pub fn capturing() -> bool {
    CAPTURING.with(|c| c.get())
}

static LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Graph launches in this process so far (tests check that a path really replays).
pub fn launches() -> usize {
    LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether steps on `device` may be captured: CUDA builds on a CUDA device, unless
/// `ROAD_CUDA_GRAPHS=0` (or [`without`] on this thread, or generic ops forced).
pub fn enabled(device: &Device) -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env = *ENV.get_or_init(|| !matches!(std::env::var("ROAD_CUDA_GRAPHS").as_deref(), Ok("0")));
    env && super::cuda_fast_path(device) && !DISABLED.with(|d| d.get())
}

/// Run `f` with graph capture off on this thread (tests compare both paths in one process).
pub fn without<T>(f: impl FnOnce() -> T) -> T {
    let old = DISABLED.with(|d| d.replace(true));
    let out = f();
    DISABLED.with(|d| d.set(old));
    out
}

/// A tensor of host data that is the same at every step (RoPE tables, masks). Outside a capture
/// session this is `Tensor::from_vec`; inside one the first upload is kept and reused, so the
/// captured kernels read the buffer the warm-up filled (candle's own cache stops at 4 KiB).
pub fn constant<T: WithDType, S: Into<candle_core::Shape>>(data: Vec<T>, shape: S, device: &Device) -> candle_core::Result<Tensor> {
    let shape: candle_core::Shape = shape.into();
    let active = MEMO.with(|m| m.borrow().is_some());
    if !active || !device.is_cuda() {
        return Tensor::from_vec(data, shape, device);
    }
    // SAFETY-free byte view: WithDType types are plain numbers.
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_f64().to_le_bytes()).collect();
    let key = (T::DTYPE, shape.dims().to_vec(), bytes);
    if let Some(t) = MEMO.with(|m| m.borrow().as_ref().and_then(|m| m.get(&key).cloned())) {
        return Ok(t);
    }
    let t = Tensor::from_vec(data, shape, device)?;
    MEMO.with(|m| m.borrow_mut().as_mut().map(|m| m.insert(key, t.clone())));
    Ok(t)
}

/// `captured`'s value, or None with a note on stderr (once per process) naming `what` now runs
/// eagerly: a capture failure costs speed, never a result.
pub fn or_eager<T>(captured: Result<T>, what: &str) -> Option<T> {
    match captured {
        Ok(c) => Some(c),
        Err(e) => {
            static NOTED: std::sync::Once = std::sync::Once::new();
            NOTED.call_once(|| eprintln!("note: {what} run without CUDA graphs ({e:#}); set ROAD_CUDA_GRAPHS=0 to skip the attempt"));
            None
        }
    }
}

/// A captured step: its outputs (tensors the graph rewrites at every launch) and the graph.
/// Fields drop in order: the outputs (freed outside the graph, which CUDA allows for graph
/// allocations), the constants, then the graph.
pub struct Graph<T> {
    out: T,
    _constants: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
}

impl<T> Graph<T> {
    /// The step's outputs as of the last launch.
    pub fn out(&self) -> &T {
        &self.out
    }

    /// Replay the step (asynchronous, on the device's stream).
    pub fn launch(&self) -> Result<()> {
        LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "cuda")]
        self.graph.launch().map_err(|e| anyhow::anyhow!("CUDA graph launch: {e:?}"))?;
        Ok(())
    }
}

/// Warm `step` up, capture it, and return the graph, not yet launched (launch it for the
/// first step's values). `step` runs twice; its warm-up outputs are dropped.
#[allow(unused_mut, unused_variables)]
pub fn capture<T>(device: &Device, mut step: impl FnMut() -> Result<T>) -> Result<Graph<T>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = cuda.cuda_stream();
        let _params = cuda.enable_cuda_graph_htod_cache();
        MEMO.with(|m| *m.borrow_mut() = Some(HashMap::new()));
        let captured = (|| -> Result<(T, candle_core::cuda_backend::cudarc::driver::CudaGraph)> {
            drop(step()?);
            device.synchronize()?;
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| anyhow::anyhow!("begin CUDA graph capture: {e:?}"))?;
            CAPTURING.with(|c| c.set(true));
            let out = step();
            CAPTURING.with(|c| c.set(false));
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
            match (out, graph) {
                (Ok(out), Ok(Some(g))) => Ok((out, g)),
                (Err(e), _) => Err(e.context("while capturing a CUDA graph")),
                (Ok(_), Err(e)) => anyhow::bail!("end CUDA graph capture: {e:?}"),
                (Ok(_), Ok(None)) => anyhow::bail!("CUDA graph capture recorded nothing"),
            }
        })();
        let constants: Vec<Tensor> = MEMO.with(|m| m.borrow_mut().take()).map(|m| m.into_values().collect()).unwrap_or_default();
        return match captured {
            Ok((out, graph)) => Ok(Graph { out, _constants: constants, graph }),
            Err(e) => {
                // A failed capture leaves its error in the context's deferred slot; clear it so
                // the eager steps that follow do not inherit it.
                let _ = stream.context().check_err();
                Err(e)
            }
        };
    }
    anyhow::bail!("CUDA graphs need a CUDA device")
}
