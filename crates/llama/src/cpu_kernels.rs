//! Which CPU kernels llama.cpp runs, and what this CPU could run beyond them.
//!
//! A default build links one set of kernels, fixed at compile time (AVX2
//! without AVX-512, see README "CPU kernels"); a host with more (AVX-512,
//! VNNI) should be told, so an operator knows what they are missing. A build
//! with `dynamic-backends` loads the best of ggml's CPU variants at start
//! (`backend_plugins.rs`), and names the file it loaded.

/// The instruction sets llama.cpp reports, the CPU backend file loaded at run
/// time if any, and the host's extras that the kernels do not use, as one
/// line for the start-up log and `GetModelInfo`.
pub fn describe(system_info: &str, backend_file: Option<&str>) -> String {
    describe_for(system_info, backend_file, &host_features())
}

/// [`describe`] for a host with the features `host` (as [`host_features`]
/// names them).
fn describe_for(system_info: &str, backend_file: Option<&str>, host: &[&str]) -> String {
    let used = used_features(system_info);
    let extras: Vec<&str> = host.iter().copied().filter(|f| !used.contains(f)).collect();
    let mut line = if used.is_empty() {
        "no SIMD kernels reported".to_string()
    } else {
        used.join(" ")
    };
    match backend_file {
        Some(file) => line.push_str(&format!(" ({file}, chosen at start)")),
        None => line.push_str(" (built in)"),
    }
    if !extras.is_empty() {
        line.push_str("; this CPU also has ");
        line.push_str(&extras.join(" "));
        line.push_str(", which these kernels do not use");
    }
    line
}

/// The features `llama_print_system_info` marks `= 1` on its CPU line
/// (`CPU : SSE3 = 1 | AVX = 1 | … |`), in its order; build facts that are
/// not instruction sets (LLAMAFILE, OPENMP, REPACK) are left out.
fn used_features(system_info: &str) -> Vec<&str> {
    const NOT_ISA: &[&str] = &["LLAMAFILE", "OPENMP", "REPACK", "KLEIDIAI"];
    let mut on_cpu = false;
    let mut used = Vec::new();
    for part in system_info.split('|') {
        // Each backend's list starts "NAME : FIRST = value".
        let mut feature = part.trim();
        if let Some((backend, first)) = feature.split_once(" : ") {
            on_cpu = backend.trim() == "CPU";
            feature = first.trim();
        }
        if let Some((name, value)) = feature.split_once(" = ") {
            if on_cpu && value.trim() == "1" && !NOT_ISA.contains(&name.trim()) {
                used.push(name.trim());
            }
        }
    }
    used
}

/// AVX-512 family and VNNI features this CPU and OS support, named as
/// llama.cpp names them.
fn host_features() -> Vec<&'static str> {
    // llama.cpp's name, then the name the variant loader checks it by.
    #[cfg(target_arch = "x86_64")]
    return [
        ("AVX512", "avx512f"),
        ("AVX512_VBMI", "avx512vbmi"),
        ("AVX512_VNNI", "avx512vnni"),
        ("AVX512_BF16", "avx512bf16"),
        ("AVX_VNNI", "avxvnni"),
    ]
    .into_iter()
    .filter(|(_, feature)| crate::backend_plugins::x86_supported(feature))
    .map(|(name, _)| name)
    .collect();
    #[cfg(not(target_arch = "x86_64"))]
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX2_BUILD: &str = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 0 | REPACK = 1 |";

    #[test]
    fn only_instruction_sets_marked_on_are_listed() {
        assert_eq!(
            used_features(AVX2_BUILD),
            ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"]
        );
        assert_eq!(
            used_features("CPU : AVX = 1 | AVX512 = 0 | OPENMP = 1 |"),
            ["AVX"]
        );
        assert!(used_features("Metal : EMBED_LIBRARY = 1 |").is_empty());
        assert_eq!(
            used_features("CPU : AVX2 = 1 | Metal : EMBED_LIBRARY = 1 |"),
            ["AVX2"]
        );
    }

    #[test]
    fn the_description_names_the_kernels_their_origin_then_only_the_hosts_extras() {
        assert_eq!(
            describe_for(AVX2_BUILD, None, &[]),
            "SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 (built in)"
        );
        assert_eq!(
            describe_for(AVX2_BUILD, None, &["AVX512", "AVX2", "AVX512_VNNI"]),
            "SSE3 SSSE3 AVX AVX2 F16C FMA BMI2 (built in); this CPU also has AVX512 \
             AVX512_VNNI, which these kernels do not use"
        );
        assert_eq!(
            describe_for(
                "CPU : AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 |",
                Some("libggml-cpu-cascadelake.so"),
                &["AVX512", "AVX512_VNNI", "AVX512_BF16"]
            ),
            "AVX2 AVX512 AVX512_VNNI (libggml-cpu-cascadelake.so, chosen at start); \
             this CPU also has AVX512_BF16, which these kernels do not use"
        );
        assert_eq!(
            describe_for("Metal : EMBED_LIBRARY = 1 |", None, &[]),
            "no SIMD kernels reported (built in)"
        );
    }
}
