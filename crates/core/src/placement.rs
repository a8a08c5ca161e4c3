//! Where llama.cpp put the model, read from what it reports while loading,
//! not echoed from the settings: a build without a GPU backend, a device ggml
//! skips (lavapipe unless named), or an `n_gpu_layers` larger than the model
//! all make the settings say something that did not happen.
//!
//! llama.cpp has no C API for this: its per-device memory breakdown
//! (`llama_get_memory_breakdown`, `mtmd_get_memory_usage`) is C++ returning
//! `std::map`. What it says in its load lines is the same data, and the
//! llama.cpp version is pinned, so the lines are read here, by rules tested
//! below on lines copied from its source.

/// What kind of device ggml says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host's CPU (or a CPU-side accelerator such as BLAS).
    Cpu,
    /// A discrete GPU, or a device served over RPC.
    Gpu,
    /// An integrated GPU.
    IntegratedGpu,
    /// Anything else ggml adds.
    Other,
}

impl DeviceKind {
    /// The name clients see.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "igpu",
            DeviceKind::Other => "other",
        }
    }

    /// Whether llama.cpp can offload layers to it.
    pub fn offloads(self) -> bool {
        matches!(self, DeviceKind::Gpu | DeviceKind::IntegratedGpu)
    }
}

/// One ggml device, as ggml reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    /// ggml's name (`Vulkan0`, `CUDA0`, `RPC0`, `CPU`).
    pub name: String,
    /// ggml's description (`llvmpipe (LLVM 15.0.6, 256 bits)`, the RPC
    /// endpoint).
    pub description: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Its memory in bytes, and how much of it is free now.
    pub memory_total: u64,
    /// Free bytes when asked.
    pub memory_free: u64,
}

/// What a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferKind {
    /// The language model's weights.
    Model,
    /// The KV cache.
    KvCache,
    /// The language model's scratch memory for a step.
    Compute,
    /// The vision encoder's scratch memory.
    VisionCompute,
}

impl BufferKind {
    /// The name clients see.
    pub fn name(self) -> &'static str {
        match self {
            BufferKind::Model => "model",
            BufferKind::KvCache => "kv_cache",
            BufferKind::Compute => "compute",
            BufferKind::VisionCompute => "vision_compute",
        }
    }
}

/// One buffer llama.cpp allocated.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// What it holds.
    pub kind: BufferKind,
    /// ggml's name of the buffer's type: the device (`Vulkan0`,
    /// `RPC0[127.0.0.1:50052]`, `CUDA0`) or host memory (`CPU`,
    /// `CPU_Mapped`, `Vulkan_Host`).
    pub location: String,
    /// Its size in bytes (llama.cpp reports MiB with two decimals).
    pub bytes: u64,
}

/// Where the model runs, as llama.cpp reported it while loading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// Layers on a device other than the CPU (the output layer counts as
    /// one, as in llama.cpp's "offloaded N/M layers to GPU").
    pub layers_offloaded: u32,
    /// Layers it could offload (repeating layers plus the output layer).
    pub layers_total: u32,
    /// Layers per device (the output layer last), in the order llama.cpp
    /// assigned them.
    pub layers_per_device: Vec<(String, u32)>,
    /// Every buffer it allocated.
    pub buffers: Vec<Buffer>,
    /// The vision encoder's backend (`Vulkan0`, `CPU`).
    pub vision_backend: String,
    /// The vision encoder's weights, in bytes.
    pub vision_model_bytes: u64,
    /// The devices ggml offered when the model was loaded, the CPU among
    /// them (filled in by the loader, not read from the lines).
    pub devices: Vec<Device>,
}

/// The text after `marker`, trimmed.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|at| line[at + marker.len()..].trim())
}

/// `   12.34 MiB` as bytes.
fn mib(text: &str) -> Option<u64> {
    let number = text.trim().strip_suffix("MiB")?.trim();
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| (value * 1024.0 * 1024.0).round() as u64)
}

/// `load_tensors:      Vulkan0 model buffer size =    25.00 MiB` as
/// (`Vulkan0`, bytes), for the given `what` (`model`, `KV`, `compute`).
fn buffer_line(line: &str, what: &str) -> Option<(String, u64)> {
    let marker = format!(" {what} buffer size = ");
    let at = line.find(&marker)?;
    let head = &line[..at];
    // The location is the last word before the marker, after the `func: `.
    let location = head.rsplit(": ").next()?.trim();
    if location.is_empty() || location.contains(' ') {
        return None;
    }
    Some((location.to_string(), mib(&line[at + marker.len()..])?))
}

impl Placement {
    /// Reads the lines llama.cpp and mtmd logged while loading the language
    /// model, the vision encoder and the context (any other lines are
    /// ignored).
    pub fn from_log(lines: &[String]) -> Placement {
        let mut placement = Placement::default();
        let mut assigned = 0u32;
        for line in lines {
            let line = line.as_str();
            if let Some(rest) = after(line, "offloaded ") {
                if let Some((counts, _)) = rest.split_once(" layers to GPU") {
                    if let Some((done, total)) = counts.split_once('/') {
                        placement.layers_offloaded = done.trim().parse().unwrap_or(0);
                        placement.layers_total = total.trim().parse().unwrap_or(0);
                    }
                }
            } else if let Some(rest) = after(line, " assigned to device ") {
                if line.contains("load_tensors: layer ") {
                    assigned += 1;
                    let device = rest.split(',').next().unwrap_or(rest).trim().to_string();
                    match placement.layers_per_device.last_mut() {
                        Some((last, n)) if *last == device => *n += 1,
                        _ => placement.layers_per_device.push((device, 1)),
                    }
                }
            } else if let Some(backend) = after(line, "CLIP using ") {
                if let Some(name) = backend.strip_suffix(" backend") {
                    placement.vision_backend = name.trim().to_string();
                }
            } else if line.contains("load_hparams: model size:") {
                if let Some(bytes) = after(line, "model size:").and_then(mib) {
                    placement.vision_model_bytes = bytes;
                }
            } else if let Some((location, bytes)) = buffer_line(line, "model") {
                placement.push(BufferKind::Model, location, bytes);
            } else if let Some((location, bytes)) = buffer_line(line, "KV") {
                placement.push(BufferKind::KvCache, location, bytes);
            } else if let Some((location, bytes)) = buffer_line(line, "compute") {
                let kind = if line.starts_with("alloc_compute_meta:") {
                    BufferKind::VisionCompute
                } else {
                    BufferKind::Compute
                };
                placement.push(kind, location, bytes);
            }
        }
        // Each layer's assignment is what happened; the "offloaded N/M" line
        // is printed from n_gpu_layers whenever the build could offload (an
        // RPC backend is enough), device or not, so it only counts when the
        // assignments were not logged.
        if assigned > 0 {
            placement.layers_total = assigned;
            placement.layers_offloaded = placement
                .layers_per_device
                .iter()
                .filter(|(device, _)| device != "CPU")
                .map(|(_, n)| n)
                .sum();
        }
        placement
    }

    /// Whether every layer is on a local GPU, so that no attention runs on a
    /// CPU: not when a layer stayed on the CPU, nor on an RPC device (whose
    /// backend, a GPU or a CPU, the service cannot see).
    pub fn all_layers_on_local_gpus(&self) -> bool {
        !self.layers_per_device.is_empty()
            && self
                .layers_per_device
                .iter()
                .all(|(device, _)| device != "CPU" && !device.starts_with("RPC"))
    }

    fn push(&mut self, kind: BufferKind, location: String, bytes: u64) {
        self.buffers.push(Buffer {
            kind,
            location,
            bytes,
        });
    }

    /// Where buffers of `kind` are, each location once, in order.
    pub fn locations(&self, kind: BufferKind) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for buffer in self.buffers.iter().filter(|b| b.kind == kind) {
            if !seen.contains(&buffer.location.as_str()) {
                seen.push(&buffer.location);
            }
        }
        seen
    }

    /// Bytes of `kind` at `location`.
    pub fn bytes(&self, kind: BufferKind, location: &str) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.kind == kind && b.location == location)
            .map(|b| b.bytes)
            .sum()
    }

    /// One line for logs and `GetModelInfo.offload`:
    /// `3/3 layers offloaded (Vulkan0: 2); model: Vulkan0 24.0 MiB, CPU_Mapped
    /// 1.0 MiB; kv_cache: Vulkan0 8.0 MiB; …; vision encoder: Vulkan0 (…)`.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!(
            "{}/{} layers offloaded",
            self.layers_offloaded, self.layers_total
        )];
        let offloading: Vec<String> = self
            .devices
            .iter()
            .filter(|d| d.kind.offloads())
            .map(|d| {
                format!(
                    "{} ({}, {:.1} GiB)",
                    d.name,
                    d.description,
                    d.memory_total as f64 / (1024.0 * 1024.0 * 1024.0)
                )
            })
            .collect();
        if !self.layers_per_device.is_empty() {
            let per: Vec<String> = self
                .layers_per_device
                .iter()
                .map(|(device, n)| format!("{device}: {n}"))
                .collect();
            parts[0].push_str(&format!(" ({})", per.join(", ")));
        }
        if !offloading.is_empty() {
            parts.push(format!("devices: {}", offloading.join(", ")));
        }
        for kind in [
            BufferKind::Model,
            BufferKind::KvCache,
            BufferKind::Compute,
            BufferKind::VisionCompute,
        ] {
            let at: Vec<String> = self
                .locations(kind)
                .into_iter()
                .map(|location| {
                    let mib = self.bytes(kind, location) as f64 / (1024.0 * 1024.0);
                    format!("{location} {mib:.1} MiB")
                })
                .collect();
            if !at.is_empty() {
                parts.push(format!("{}: {}", kind.name(), at.join(", ")));
            }
        }
        if !self.vision_backend.is_empty() {
            parts.push(format!(
                "vision encoder: {} ({:.1} MiB)",
                self.vision_backend,
                self.vision_model_bytes as f64 / (1024.0 * 1024.0)
            ));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    /// The lines as llama.cpp's format strings print them (llama-model.cpp,
    /// llama-kv-cache.cpp, llama-context.cpp, clip.cpp), for a model split
    /// over two RPC devices with the vision encoder on a Vulkan device.
    const SPLIT: &str = "\
load_tensors: layer   0 assigned to device RPC0, is_swa = 0
load_tensors: layer   1 assigned to device RPC1, is_swa = 0
load_tensors: layer   2 assigned to device RPC1, is_swa = 0
load_tensors: offloading output layer to GPU
load_tensors: offloading 1 repeating layers to GPU
load_tensors: offloaded 3/3 layers to GPU
load_tensors: RPC0[127.0.0.1:50052] model buffer size =     0.41 MiB
load_tensors: RPC1[127.0.0.1:50053] model buffer size =     4.39 MiB
load_tensors:   CPU_Mapped model buffer size =     4.00 MiB
clip_ctx: CLIP using Vulkan0 backend
load_hparams: model size:         11.50 MiB
alloc_compute_meta:    Vulkan0 compute buffer size =     3.25 MiB
alloc_compute_meta:        CPU compute buffer size =     0.02 MiB
llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =     1.00 MiB
llama_kv_cache: RPC1[127.0.0.1:50053] KV buffer size =     1.00 MiB
llama_context:  CPU  output buffer size =     1.16 MiB
llama_context: RPC0[127.0.0.1:50052] compute buffer size =     2.50 MiB
llama_context:        CPU compute buffer size =     0.52 MiB";

    #[test]
    fn layers_buffers_and_the_encoder_are_read_from_the_load_lines() {
        let p = Placement::from_log(&lines(SPLIT));
        assert_eq!((p.layers_offloaded, p.layers_total), (3, 3));
        assert_eq!(
            p.layers_per_device,
            [("RPC0".to_string(), 1), ("RPC1".to_string(), 2)]
        );
        assert_eq!(
            p.locations(BufferKind::Model),
            [
                "RPC0[127.0.0.1:50052]",
                "RPC1[127.0.0.1:50053]",
                "CPU_Mapped"
            ]
        );
        assert_eq!(
            p.bytes(BufferKind::Model, "RPC1[127.0.0.1:50053]"),
            (4.39f64 * 1048576.0).round() as u64
        );
        assert_eq!(
            p.locations(BufferKind::KvCache),
            ["RPC0[127.0.0.1:50052]", "RPC1[127.0.0.1:50053]"]
        );
        assert_eq!(
            p.locations(BufferKind::Compute),
            ["RPC0[127.0.0.1:50052]", "CPU"]
        );
        assert_eq!(p.locations(BufferKind::VisionCompute), ["Vulkan0", "CPU"]);
        assert_eq!(p.vision_backend, "Vulkan0");
        assert_eq!(p.vision_model_bytes, (11.5f64 * 1048576.0) as u64);
        let summary = p.summary();
        assert!(
            summary.starts_with("3/3 layers offloaded (RPC0: 1, RPC1: 2)"),
            "{summary}"
        );
        assert!(summary.contains("kv_cache: RPC0[127.0.0.1:50052] 1.0 MiB"));
        assert!(summary.ends_with("vision encoder: Vulkan0 (11.5 MiB)"));
        assert!(!p.all_layers_on_local_gpus(), "RPC devices may be CPUs");
    }

    #[test]
    fn only_every_layer_on_a_local_gpu_counts_as_on_the_gpu() {
        let assigned = |devices: &[&str]| {
            let text: Vec<String> = devices
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    format!("load_tensors: layer {i:3} assigned to device {d}, is_swa = 0")
                })
                .collect();
            Placement::from_log(&text).all_layers_on_local_gpus()
        };
        assert!(assigned(&["Vulkan0", "Vulkan0", "Vulkan0"]));
        assert!(assigned(&["CUDA0", "CUDA1", "CUDA1"]));
        assert!(!assigned(&["CPU", "Vulkan0", "Vulkan0"]), "partial offload");
        assert!(!assigned(&["CUDA0", "RPC0", "RPC0"]));
        assert!(!assigned(&[]), "nothing logged");
    }

    #[test]
    fn without_a_device_nothing_is_offloaded_whatever_llama_cpp_announces() {
        // A build with the RPC backend and no server: llama.cpp still says
        // it offloaded every layer.
        let p = Placement::from_log(&lines(
            "load_tensors: layer   0 assigned to device CPU, is_swa = 0\n\
             load_tensors: layer   1 assigned to device CPU, is_swa = 0\n\
             load_tensors: layer   2 assigned to device CPU, is_swa = 0\n\
             load_tensors: offloaded 3/3 layers to GPU\n\
             load_tensors:   CPU_Mapped model buffer size =     8.00 MiB\n\
             clip_ctx: CLIP using CPU backend",
        ));
        assert_eq!((p.layers_offloaded, p.layers_total), (0, 3));
        assert_eq!(p.layers_per_device, [("CPU".to_string(), 3)]);
        assert_eq!(p.vision_backend, "CPU");
    }

    #[test]
    fn other_lines_and_malformed_sizes_are_ignored() {
        let p = Placement::from_log(&lines(
            "llama_model_loader: - kv   0: general.architecture str = qwen2\n\
             load_tensors: Vulkan0 model buffer size = lots MiB\n\
             print_info: model type = 0.5B",
        ));
        assert_eq!(p, Placement::default());
    }
}
