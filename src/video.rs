//! Video files (`Video.data`, or `Video.url` once fetched), decoded as
//! transformers' `read_video_pyav` decodes them: every frame of the first
//! video stream in order, converted to RGB24 by FFmpeg's swscale, of which
//! the [`Sampling`] indices are kept.
//!
//! FFmpeg runs as a subprocess, not linked: a codec's crash or assertion
//! ends that process, never the server, and no codec's licence reaches this
//! binary. Each run:
//! - gets the file on stdin as an in-memory file (memfd: no path anyone
//!   names, nothing written to disk, and seekable, so an MP4 whose index is
//!   at its end decodes, which a pipe cannot do);
//! - may read it through the `file` protocol only, with the demuxers and
//!   decoders in [`FORMATS`] and [`CODECS`] (no network, no `concat`, no
//!   playlists);
//! - is started by this binary's `confine` subcommand (`crate::confine`):
//!   resource limits (address space `media_video_memory_mb`, no core file,
//!   no file written), no inherited descriptor, then, unless
//!   `media_video_sandbox = off`, Landlock (nothing read but the system's
//!   `/usr`, nothing written) and a seccomp filter (no socket, no other
//!   process, no namespace); with `auto`, inside bubblewrap's namespaces too
//!   where this machine lets it make them (not in a pod under the
//!   runtime's default seccomp profile);
//! - is killed past `media_video_timeout_secs`.
//!
//! `ffprobe` reads the stream's size, frame count and rate first (demuxing
//! only), so an oversized frame or sample is refused before any decoding.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use image::RgbImage;
use internvl_api::config::Config;
use internvl_core::error::{EngineError, MediaFailure};
use internvl_core::media_budget::MediaHold;
use internvl_core::{ChatMessage, DecodeLimits, Part, Sampling, VideoSandbox, VideoSource};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::Semaphore;

/// Demuxers FFmpeg may open: MP4/MOV and Matroska/WebM.
pub const FORMATS: &str = "mov,matroska";
/// Decoders FFmpeg may use: video ones, and the audio ones common in these
/// containers, because opening a file probes every stream (ffprobe refuses
/// a file whose audio decoder is not listed). No audio is decoded for output.
pub const CODECS: &str = "h264,hevc,vp8,vp9,libdav1d,av1,mpeg4,\
                          aac,mp3float,mp3,opus,libopus,vorbis,flac,ac3,eac3,alac,pcm_s16le";
/// Most of FFmpeg's error output kept for a message.
const STDERR_BYTES: usize = 4096;

/// How each FFmpeg run is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Launch {
    /// bubblewrap's namespaces, and inside them the confinement.
    Namespaces,
    /// The confinement alone (`src/confine.rs`).
    Confined,
    /// Resource limits only.
    LimitsOnly,
}

impl Launch {
    /// What `sandbox` allows, strongest first.
    fn candidates(sandbox: VideoSandbox) -> &'static [Launch] {
        match sandbox {
            VideoSandbox::Auto => &[Launch::Namespaces, Launch::Confined],
            VideoSandbox::Landlock => &[Launch::Confined],
            VideoSandbox::Off => &[Launch::LimitsOnly],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Launch::Namespaces => "bubblewrap namespaces, Landlock and seccomp",
            Launch::Confined => "Landlock and seccomp",
            Launch::LimitsOnly => "resource limits only (media_video_sandbox = off)",
        }
    }
}

/// Decodes video files for requests.
pub struct VideoDecoder {
    /// FFmpeg and ffprobe, or why video files are off.
    programs: Result<(PathBuf, PathBuf), String>,
    sandbox: VideoSandbox,
    /// How FFmpeg is started: the strongest of `sandbox`'s candidates, once
    /// [`Self::check`] has found which runs.
    launch: Launch,
    /// The binary whose `confine` subcommand starts FFmpeg.
    helper: PathBuf,
    /// FFmpeg's version line, once checked.
    version: String,
    timeout: Duration,
    memory_bytes: u64,
    max_decoded_bytes: u64,
    limits: DecodeLimits,
    /// Most frames one video may give (`max_images_per_request`); the
    /// request's total was checked with `num_frames` before `fps` was known.
    max_frames: usize,
    /// Decodes at once: each is a process with its own threads.
    running: Semaphore,
}

/// What ffprobe says of the first video stream.
#[derive(Debug, serde::Deserialize)]
struct Probe {
    #[serde(default)]
    streams: Vec<Stream>,
}

#[derive(Debug, serde::Deserialize)]
struct Stream {
    width: Option<u32>,
    height: Option<u32>,
    /// The container's frame count (`stream.frames` in PyAV), when it has one.
    nb_frames: Option<String>,
    nb_read_packets: Option<String>,
    avg_frame_rate: Option<String>,
}

fn invalid(field: &str, message: impl Into<String>) -> EngineError {
    EngineError::invalid(format!("{field}.data"), message)
}

fn failure(field: &str, failure: MediaFailure, message: impl Into<String>) -> EngineError {
    EngineError::Media {
        field: format!("{field}.data"),
        failure,
        message: message.into(),
    }
}

/// `name` as a path: itself when it has a `/`, else found on `PATH`.
fn locate(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return path.is_file().then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// "30000/1001" as a number; `None` for "0/0" and the like.
fn rate(text: &str) -> Option<f64> {
    let (num, den) = text.split_once('/')?;
    let (num, den): (f64, f64) = (num.parse().ok()?, den.parse().ok()?);
    let rate = num / den;
    (rate.is_finite() && rate > 0.0).then_some(rate)
}

/// The first line of FFmpeg's complaint, for a client's message.
fn complaint(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no detail");
    // "/dev/stdin: Invalid data…" names our pipe, not the client's file.
    line.trim_start_matches("/dev/stdin: ")
        .chars()
        .take(200)
        .collect()
}

impl VideoDecoder {
    /// The decoder of `config`'s `media_ffmpeg` and `media_video_*` keys.
    pub fn new(config: &Config) -> Self {
        let programs = if config.media_ffmpeg.is_empty() {
            Err("video files are off in this deployment (media_ffmpeg is empty)".to_string())
        } else {
            match locate(&config.media_ffmpeg) {
                None => Err(format!(
                    "no FFmpeg program {:?} here (media_ffmpeg)",
                    config.media_ffmpeg
                )),
                Some(ffmpeg) => {
                    let ffprobe = ffmpeg.with_file_name("ffprobe");
                    if ffprobe.is_file() {
                        Ok((ffmpeg, ffprobe))
                    } else {
                        Err(format!("no ffprobe beside {}", ffmpeg.display()))
                    }
                }
            }
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            programs,
            sandbox: config.media_video_sandbox,
            launch: Launch::candidates(config.media_video_sandbox)[0],
            helper: config
                .media_confine_program
                .clone()
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
            version: String::new(),
            timeout: Duration::from_secs_f64(config.media_video_timeout_secs),
            memory_bytes: config.media_video_memory_mb.saturating_mul(1024 * 1024),
            max_decoded_bytes: config
                .media_video_max_decoded_mb
                .saturating_mul(1024 * 1024),
            limits: config.decode_limits(),
            max_frames: config
                .max_images_per_request
                .min(internvl_api::validation::MAX_VIDEO_FRAMES),
            running: Semaphore::new(cores),
        }
    }

    /// Runs FFmpeg once as requests will, so a deployment whose FFmpeg or
    /// sandbox cannot run learns it at start, not from its first video.
    /// Returns FFmpeg's version line, or why video files are off; when they
    /// are, every video file is answered FAILED_PRECONDITION with that
    /// reason (decided here, once: a sandbox that cannot start is the
    /// deployment's fault, not the file's).
    pub async fn check(&mut self) -> Result<String, String> {
        if let Err(why) = &self.programs {
            return Err(why.clone());
        }
        let mut failures = Vec::new();
        for &launch in Launch::candidates(self.sandbox) {
            match self.try_run(launch).await {
                Ok(version) => {
                    self.launch = launch;
                    self.version.clone_from(&version);
                    return Ok(version);
                }
                Err(why) => failures.push(why),
            }
        }
        let why = failures.join("; ");
        self.programs = Err(why.clone());
        Err(why)
    }

    async fn try_run(&self, launch: Launch) -> Result<String, String> {
        let (ffmpeg, _) = self.programs.as_ref().map_err(Clone::clone)?;
        let input = Self::input(&[]).map_err(|e| e.to_string())?;
        let output = self
            .command(launch, ffmpeg, &["-version".to_string()], input)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", launch.describe()))?;
        if !output.status.success() {
            return Err(format!(
                "{} -version failed under {}: {}",
                ffmpeg.display(),
                launch.describe(),
                complaint(&output.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// How FFmpeg runs here and its version line (after [`Self::check`]),
    /// or why video files are off.
    pub fn confinement(&self) -> Result<(&'static str, &str), &str> {
        match &self.programs {
            Ok(_) => Ok((self.launch.describe(), &self.version)),
            Err(why) => Err(why),
        }
    }

    /// `program args…` as `launch` starts it, reading `input` on stdin.
    fn command(
        &self,
        launch: Launch,
        program: &Path,
        args: &[String],
        input: std::fs::File,
    ) -> Command {
        let mut command = if launch == Launch::Namespaces {
            let mut bwrap = Command::new("bwrap");
            bwrap.args([
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
                "--cap-drop",
                "ALL",
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--symlink",
                "usr/bin",
                "/bin",
                "--ro-bind-try",
                "/etc/ld.so.cache",
                "/etc/ld.so.cache",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
            ]);
            // A program outside /usr brings its own folder, read-only; so
            // does the confining binary (with the libraries beside it).
            for folder in [program.parent(), self.helper.parent()]
                .into_iter()
                .flatten()
                .filter(|d| !d.starts_with("/usr"))
            {
                bwrap.arg("--ro-bind").arg(folder).arg(folder);
            }
            bwrap.arg("--").arg(&self.helper);
            bwrap
        } else {
            Command::new(&self.helper)
        };
        let request = crate::confine::Request {
            memory_bytes: self.memory_bytes,
            limits_only: launch == Launch::LimitsOnly,
            program: program.to_path_buf(),
            args: args.iter().map(Into::into).collect(),
        };
        command
            .args(request.to_args())
            .env_clear()
            .stdin(Stdio::from(input))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Decodes every video file among the parts of `messages`, their frames
    /// taken from the request's `media` share first.
    pub async fn messages(
        &self,
        messages: &mut [ChatMessage],
        media: &mut MediaHold,
    ) -> Result<(), EngineError> {
        for (m, message) in messages.iter_mut().enumerate() {
            let field = format!("messages[{m}]");
            self.parts(&mut message.parts, &field, media).await?;
        }
        Ok(())
    }

    /// Decodes every video file among an Embed request's `inputs`.
    pub async fn embed_inputs(
        &self,
        inputs: &mut [Vec<Part>],
        media: &mut MediaHold,
    ) -> Result<(), EngineError> {
        for (i, parts) in inputs.iter_mut().enumerate() {
            self.parts(parts, &format!("inputs[{i}]"), media).await?;
        }
        Ok(())
    }

    async fn parts(
        &self,
        parts: &mut [Part],
        field: &str,
        media: &mut MediaHold,
    ) -> Result<(), EngineError> {
        for (c, part) in parts.iter_mut().enumerate() {
            let Part::Video(video) = part else { continue };
            let VideoSource::File(data) = &video.source else {
                continue;
            };
            let field = format!("{field}.content[{c}].video");
            let frames = self.decode(data, video.sampling, &field, media).await?;
            video.source = VideoSource::Sampled(frames);
        }
        Ok(())
    }

    /// The frames [`Sampling`] picks from the video file `data`; `field` is
    /// the video's path (`….video`).
    pub async fn decode(
        &self,
        data: &[u8],
        sampling: Sampling,
        field: &str,
        media: &mut MediaHold,
    ) -> Result<Vec<RgbImage>, EngineError> {
        let (ffmpeg, ffprobe) = self
            .programs
            .as_ref()
            .map_err(|why| failure(field, MediaFailure::Unavailable, why.clone()))?;
        let _turn = self
            .running
            .acquire()
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        // Written once; the probe and the decode each read their own handle.
        let input = Self::input(data)?;
        let work = async {
            let probe = self.probe(ffprobe, &input, field).await?;
            self.frames(ffmpeg, &input, sampling, &probe, field, media)
                .await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(failure(
                    field,
                    MediaFailure::TimedOut,
                    format!(
                        "decoding took longer than {} s (media_video_timeout_secs)",
                        self.timeout.as_secs_f64()
                    ),
                ))
            })
    }

    /// `data` in an in-memory file, at its start.
    fn input(data: &[u8]) -> Result<std::fs::File, EngineError> {
        let fault =
            |e: std::io::Error| EngineError::Fault(format!("in-memory file for a video: {e}"));
        let fd = rustix::fs::memfd_create("internvl-video", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| fault(e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(data)
            .and_then(|_| file.rewind())
            .map_err(fault)?;
        Ok(file)
    }

    /// A handle on `input` for one process's stdin, at the file's start.
    fn stdin(input: &std::fs::File) -> Result<std::fs::File, EngineError> {
        let mut handle = input
            .try_clone()
            .map_err(|e| EngineError::Fault(format!("in-memory file for a video: {e}")))?;
        handle
            .rewind()
            .map_err(|e| EngineError::Fault(format!("in-memory file for a video: {e}")))?;
        Ok(handle)
    }

    fn input_args() -> Vec<String> {
        [
            "-protocol_whitelist",
            "file",
            "-format_whitelist",
            FORMATS,
            "-codec_whitelist",
            CODECS,
        ]
        .map(String::from)
        .to_vec()
    }

    async fn probe(
        &self,
        ffprobe: &Path,
        input: &std::fs::File,
        field: &str,
    ) -> Result<Stream, EngineError> {
        let mut args = vec!["-v".into(), "error".into()];
        args.extend(Self::input_args());
        args.extend(
            [
                "-count_packets",
                "-select_streams",
                "v:0",
                "-show_entries",
                "stream=width,height,nb_frames,nb_read_packets,avg_frame_rate",
                "-of",
                "json",
                "-i",
                "/dev/stdin",
            ]
            .map(String::from),
        );
        let output = self
            .command(self.launch, ffprobe, &args, Self::stdin(input)?)
            .output()
            .await
            .map_err(|e| failure(field, MediaFailure::Unavailable, format!("ffprobe: {e}")))?;
        if !output.status.success() {
            return Err(invalid(
                field,
                format!("not a decodable video: {}", complaint(&output.stderr)),
            ));
        }
        let probe: Probe = serde_json::from_slice(&output.stdout).map_err(|e| {
            EngineError::Fault(format!("ffprobe's output is not what was asked: {e}"))
        })?;
        probe
            .streams
            .into_iter()
            .next()
            .ok_or_else(|| invalid(field, "has no video stream"))
    }

    /// The frames [`Self::plan`] picks from `input` (probed as `stream`),
    /// decoded by one ffmpeg run; fewer than asked for is refused, naming them.
    async fn frames(
        &self,
        ffmpeg: &Path,
        input: &std::fs::File,
        sampling: Sampling,
        stream: &Stream,
        field: &str,
        media: &mut MediaHold,
    ) -> Result<Vec<RgbImage>, EngineError> {
        let Plan {
            width,
            height,
            indices,
        } = self.plan(sampling, stream, field)?;
        let frame_bytes = width as usize * height as usize * 3;
        media.take(
            (frame_bytes * indices.len()) as u64,
            &format!("{field}.data"),
        )?;
        let args = Self::decode_args(&indices);
        let mut child = self
            .command(self.launch, ffmpeg, &args, Self::stdin(input)?)
            .spawn()
            .map_err(|e| failure(field, MediaFailure::Unavailable, format!("ffmpeg: {e}")))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let read_frames = async {
            let mut frames = Vec::with_capacity(indices.len());
            for _ in &indices {
                let mut pixels = vec![0u8; frame_bytes];
                match stdout.read_exact(&mut pixels).await {
                    Ok(_) => frames.push(
                        RgbImage::from_raw(width, height, pixels).expect("sized for the frame"),
                    ),
                    Err(_) => break,
                }
            }
            frames
        };
        // Read to the end, keeping the start: a process blocked on a full
        // stderr pipe would never finish its frames.
        let read_errors = async {
            let mut kept = Vec::new();
            let _ = (&mut stderr)
                .take(STDERR_BYTES as u64)
                .read_to_end(&mut kept)
                .await;
            let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            kept
        };
        let (frames, complaints) = tokio::join!(read_frames, read_errors);
        // Closed before waiting: a process with more to write gets a broken
        // pipe and ends, rather than waiting on us until the timeout.
        drop(stdout);
        let status = child
            .wait()
            .await
            .map_err(|e| EngineError::Fault(format!("waiting for ffmpeg: {e}")))?;
        if frames.len() < indices.len() {
            let why = if status.success() {
                "truncated or corrupt".to_string()
            } else {
                complaint(&complaints)
            };
            return Err(invalid(
                field,
                format!(
                    "decoded {} of the {} sampled frames ({}); {why}",
                    frames.len(),
                    indices.len(),
                    indices
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(frames)
    }

    /// The frames to decode, after the checks the probe allows before any
    /// decoding: the frame size, the sample against the frame count, the
    /// request's image limit and `media_video_max_decoded_mb`.
    fn plan(&self, sampling: Sampling, stream: &Stream, field: &str) -> Result<Plan, EngineError> {
        let (Some(width), Some(height)) = (stream.width, stream.height) else {
            return Err(invalid(field, "the video stream has no frame size"));
        };
        if width == 0
            || height == 0
            || width > self.limits.max_side
            || height > self.limits.max_side
            || u64::from(width) * u64::from(height) > self.limits.max_pixels
        {
            return Err(invalid(
                field,
                format!(
                    "frames are {width}x{height}; at most {} pixels a side and {} in all",
                    self.limits.max_side, self.limits.max_pixels
                ),
            ));
        }
        // PyAV's `stream.frames` when the container counts them (MP4);
        // else (WebM, where PyAV reads 0) the packets demuxed.
        let count = |n: &Option<String>| n.as_deref().and_then(|n| n.parse::<usize>().ok());
        let total = count(&stream.nb_frames)
            .filter(|n| *n > 0)
            .or_else(|| count(&stream.nb_read_packets))
            .unwrap_or(0);
        let source_fps = stream.avg_frame_rate.as_deref().and_then(rate);
        let indices = sampling.indices(total, source_fps, self.max_frames, field)?;
        let decoded = (width as usize * height as usize * 3 * indices.len()) as u64;
        if decoded > self.max_decoded_bytes {
            return Err(failure(
                field,
                MediaFailure::TooLarge,
                format!(
                    "{} frames of {width}x{height} are {} MiB as RGB, more than \
                     media_video_max_decoded_mb ({}); sample fewer frames",
                    indices.len(),
                    decoded.div_ceil(1024 * 1024),
                    self.max_decoded_bytes / (1024 * 1024)
                ),
            ));
        }
        Ok(Plan {
            width,
            height,
            indices,
        })
    }

    /// ffmpeg's arguments to write the frames at `indices` of the first
    /// video stream on stdin, and only those, as raw RGB24 on stdout.
    fn decode_args(indices: &[usize]) -> Vec<String> {
        let select = indices
            .iter()
            .map(|i| format!("eq(n,{i})"))
            .collect::<Vec<_>>()
            .join("+");
        let mut args = vec!["-v".into(), "error".into(), "-nostdin".into()];
        args.extend(Self::input_args());
        args.extend(
            [
                // PyAV does not apply a rotation tag either.
                "-noautorotate",
                "-i",
                "/dev/stdin",
                "-map",
                "0:v:0",
                "-vf",
                &format!("select='{select}'"),
                "-fps_mode",
                "passthrough",
                // PyAV's `to_ndarray(format="rgb24")` converts with bilinear
                // swscale; same-size YUV to RGB is bit-exact with it here.
                "-sws_flags",
                "bilinear",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "pipe:1",
            ]
            .map(String::from),
        );
        args
    }
}

/// What [`VideoDecoder::plan`] allows: the frame size and which frames.
struct Plan {
    width: u32,
    height: u32,
    indices: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_ffprobe_writes_them() {
        assert_eq!(rate("4/1"), Some(4.0));
        assert!((rate("30000/1001").unwrap() - 29.97).abs() < 1e-3);
        assert_eq!(rate("0/0"), None);
        assert_eq!(rate("25"), None);
    }

    #[test]
    fn complaints_lose_the_pipe_name_and_stay_short() {
        let said = complaint(b"\n/dev/stdin: Invalid data found when processing input\n");
        assert_eq!(said, "Invalid data found when processing input");
        assert_eq!(complaint(&[b'x'; 1000]).len(), 200);
        assert_eq!(complaint(b""), "no detail");
    }
}
