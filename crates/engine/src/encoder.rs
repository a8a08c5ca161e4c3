//! The vision encoder on a thread of its own.
//!
//! Encoding one tile is a single llama.cpp graph that cannot be split: seconds
//! for InternViT-300M on 2 CPU cores (benches/README.md). Run on the engine
//! thread it stalled every running stream for that long per tile, long enough
//! for a mesh's idle timeout to cut them. Here the engine hands over one
//! tile at a time and keeps decoding; it sends the next tile only when the last
//! is back, so the oldest request's tiles go first and a cancelled request
//! wastes at most the tile being encoded.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::llama::{capture_logs, Model, Vision, VisionParams};
use super::protocol::Doorbell;
use internvl_core::error::EngineError;
use internvl_core::vision::TileHash;

/// A tile's embeddings, or why it could not be encoded.
pub(crate) type EncodeResult = Result<Arc<Vec<f32>>, String>;

/// One finished tile.
pub(crate) struct Encoded {
    pub hash: TileHash,
    pub result: EncodeResult,
    /// Time the encoder spent on it.
    pub took: Duration,
}

struct Job {
    hash: TileHash,
    rgb: Vec<u8>,
}

/// Handle to the encoder thread, owned by the engine thread.
pub(crate) struct TileEncoder {
    jobs: Option<SyncSender<Job>>,
    results: Receiver<Encoded>,
    /// The tile being encoded now.
    busy: Option<TileHash>,
    thread: Option<JoinHandle<()>>,
}

impl TileEncoder {
    /// Loads the mmproj on a new thread, which then encodes `side` × `side`
    /// RGB tiles on request; returns once loading succeeded or failed, with
    /// what llama.cpp logged while loading (where it put the encoder).
    pub fn start(
        mmproj: &Path,
        model: Arc<Model>,
        params: &VisionParams,
        side: u32,
        bell: Arc<Doorbell>,
    ) -> Result<(Self, Vec<String>), EngineError> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (result_tx, results) = mpsc::channel();
        let (loaded_tx, loaded_rx) = mpsc::sync_channel(1);
        let (path, params) = (mmproj.to_path_buf(), params.clone());
        let thread = std::thread::Builder::new()
            .name("internvl-vision".into())
            .spawn(move || {
                let (vision, log) = capture_logs(|| Vision::load(&path, model, &params));
                let (mut vision, loaded) = match vision {
                    Ok(vision) => (Some(vision), Ok(log)),
                    Err(e) => (None, Err(e)),
                };
                // A failed send means start() gave up waiting: nothing to serve.
                let (Some(vision), Ok(())) = (vision.as_mut(), loaded_tx.send(loaded)) else {
                    return;
                };
                while let Ok(job) = job_rx.recv() {
                    let started = Instant::now();
                    let result = vision
                        .encode_tile(&job.rgb, side)
                        .map(Arc::new)
                        .map_err(|e| e.to_string());
                    let encoded = Encoded {
                        hash: job.hash,
                        result,
                        took: started.elapsed(),
                    };
                    if result_tx.send(encoded).is_err() {
                        return;
                    }
                    // The engine thread may be waiting for this tile alone.
                    bell.ring();
                }
            })
            .map_err(|e| {
                EngineError::Inference(format!("could not start the vision thread: {e}"))
            })?;
        let loaded = loaded_rx.recv().unwrap_or_else(|_| {
            Err(EngineError::Inference(
                "the vision thread stopped while loading the mmproj".into(),
            ))
        });
        let encoder = Self {
            jobs: Some(jobs),
            results,
            busy: None,
            thread: Some(thread),
        };
        loaded.map(|log| (encoder, log))
    }

    /// Whether a tile can be handed over now.
    pub fn is_idle(&self) -> bool {
        self.busy.is_none()
    }

    /// Starts encoding a tile; only when [`TileEncoder::is_idle`], so the
    /// thread has taken the last job and the channel has room.
    pub fn submit(&mut self, hash: TileHash, rgb: Vec<u8>) {
        debug_assert!(self.busy.is_none(), "one tile at a time");
        if let Some(jobs) = &self.jobs {
            // Failing means the thread is gone; `finished` reports that.
            if jobs.try_send(Job { hash, rgb }).is_err() {
                tracing::error!("the vision encoder thread is not taking tiles");
            }
        }
        self.busy = Some(hash);
    }

    /// The tile that finished since the last call, if any.
    pub fn finished(&mut self) -> Option<Encoded> {
        let hash = self.busy?;
        let encoded = match self.results.try_recv() {
            Ok(encoded) => encoded,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Encoded {
                hash,
                result: Err("the vision encoder thread stopped".into()),
                took: Duration::ZERO,
            },
        };
        self.busy = None;
        Some(encoded)
    }
}

impl Drop for TileEncoder {
    fn drop(&mut self) {
        // Closing the job channel ends the thread after its current tile.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the vision encoder thread panicked");
            }
        }
    }
}
