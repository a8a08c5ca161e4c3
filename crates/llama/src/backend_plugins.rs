//! Which of ggml's backend plugins a `dynamic-backends` build loads from a
//! folder: one CPU variant, and every other backend (a GPU's).
//!
//! ggml's loader ranks the CPU variants by CPUID alone (its x86 score has a
//! FIXME for OS support), so on a host whose kernel leaves AVX-512 state off
//! it would pick a variant that dies with SIGILL. The choice is made here
//! instead, with the same ranking, over what Rust's feature detection says
//! the CPU *and* OS run. The rules are unit-tested in every build; only a
//! `dynamic-backends` build loads plugins (`x86_supported` also serves
//! `cpu_kernels.rs` in every build).
#![cfg_attr(not(feature = "dynamic-backends"), allow(dead_code))]

/// The plugins among a folder's file names: `libggml-KIND.so` or
/// `libggml-KIND-VARIANT.so`, split into CPU variants and other backends, each
/// sorted. The core libraries beside them (`libggml-base.so`, versioned
/// names) are not plugins.
pub fn plugins_in(names: impl IntoIterator<Item = String>) -> (Vec<String>, Vec<String>) {
    let mut plugins: Vec<String> = names
        .into_iter()
        .filter(|name| {
            name.starts_with("libggml-") && name.ends_with(".so") && name != "libggml-base.so"
        })
        .collect();
    plugins.sort();
    plugins
        .into_iter()
        .partition(|name| name.starts_with("libggml-cpu"))
}

/// ggml's x86 CPU variants (`GGML_CPU_ALL_VARIANTS` in ggml/src/CMakeLists.txt)
/// and the instruction sets each is compiled for, as Rust's
/// `is_x86_feature_detected!` names them.
const X86_VARIANTS: [(&str, &[&str]); 14] = [
    ("x64", &[]),
    ("sse42", &["sse4.2"]),
    ("sandybridge", &["sse4.2", "avx"]),
    ("ivybridge", &["sse4.2", "avx", "f16c"]),
    ("piledriver", &["sse4.2", "avx", "f16c", "fma"]),
    ("haswell", &HASWELL),
    ("skylakex", &concat::<11>(&[&HASWELL, &AVX512])),
    (
        "cannonlake",
        &concat::<12>(&[&HASWELL, &AVX512, &["avx512vbmi"]]),
    ),
    (
        "cascadelake",
        &concat::<12>(&[&HASWELL, &AVX512, &["avx512vnni"]]),
    ),
    (
        "icelake",
        &concat::<13>(&[&HASWELL, &AVX512, &["avx512vbmi", "avx512vnni"]]),
    ),
    (
        "cooperlake",
        &concat::<13>(&[&HASWELL, &AVX512, &["avx512vnni", "avx512bf16"]]),
    ),
    ("zen4", &concat::<14>(&[&HASWELL, &AVX512, &ZEN4_EXTRAS])),
    ("alderlake", &concat::<7>(&[&HASWELL, &["avxvnni"]])),
    (
        "sapphirerapids",
        &concat::<16>(&[&HASWELL, &AVX512, &ZEN4_EXTRAS, &["amx-tile", "amx-int8"]]),
    ),
];
const HASWELL: [&str; 6] = ["sse4.2", "avx", "f16c", "fma", "avx2", "bmi2"];
const AVX512: [&str; 5] = ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"];
const ZEN4_EXTRAS: [&str; 3] = ["avx512vbmi", "avx512vnni", "avx512bf16"];

/// The features of a variant, written as its groups (a `const` cannot
/// allocate, so the lists are joined into a fixed-size array).
const fn concat<const N: usize>(groups: &[&[&'static str]]) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut g, mut n) = (0, 0);
    while g < groups.len() {
        let mut i = 0;
        while i < groups[g].len() {
            out[n] = groups[g][i];
            n += 1;
            i += 1;
        }
        g += 1;
    }
    assert!(n == N, "feature count");
    out
}

/// How ggml ranks a variant (`ggml_backend_cpu_x86_score` in
/// ggml-cpu/arch/x86/cpu-feats.cpp): one bit per instruction-set group.
fn x86_rank(features: &[&str]) -> u32 {
    1 + features
        .iter()
        .map(|f| match *f {
            "fma" => 1,
            "f16c" => 1 << 1,
            "sse4.2" => 1 << 2,
            "bmi2" => 1 << 3,
            "avx" => 1 << 4,
            "avx2" => 1 << 5,
            "avxvnni" => 1 << 6,
            "avx512f" => 1 << 7,
            "avx512vbmi" => 1 << 8,
            "avx512bf16" => 1 << 9,
            "avx512vnni" => 1 << 10,
            "amx-int8" => 1 << 11,
            _ => 0,
        })
        .sum::<u32>()
}

/// Of the CPU variant plugins in a folder (`libggml-cpu-haswell.so`, …), the
/// one ggml would rank best among those whose every instruction set `supported`
/// says this CPU and its OS can run.
pub fn choose_x86_variant<'a>(
    files: &[&'a str],
    supported: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    files
        .iter()
        .filter_map(|file| {
            let name = file.strip_prefix("libggml-cpu-")?.strip_suffix(".so")?;
            let (_, features) = X86_VARIANTS.iter().find(|(v, _)| *v == name)?;
            features
                .iter()
                .all(|f| supported(f))
                .then(|| (x86_rank(features), *file))
        })
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, file)| file)
}

/// Whether this CPU and OS run `feature` (a name from [`X86_VARIANTS`]).
/// AMX never counts: on a Sapphire Rapids VM (Linux 6.18, AMX in CPUID and
/// XCR0, `ARCH_REQ_XCOMP_PERM` granted, a hand-written `ldtilecfg` +
/// `tilezero` running fine) the sapphirerapids variant's Q8_0 kernel died
/// with SIGILL at `tileloadd` in `tinygemm_kernel_amx` on the engine thread
/// (`tests/it/real_files.rs`, 2026-12-08). Until that is understood the
/// zen4-class variant (the same AVX-512 sets, no AMX) is chosen there.
#[cfg(target_arch = "x86_64")]
pub fn x86_supported(feature: &str) -> bool {
    use std::arch::is_x86_feature_detected as has;
    match feature {
        "sse4.2" => has!("sse4.2"),
        "avx" => has!("avx"),
        "f16c" => has!("f16c"),
        "fma" => has!("fma"),
        "avx2" => has!("avx2"),
        "bmi2" => has!("bmi2"),
        "avx512f" => has!("avx512f"),
        "avx512cd" => has!("avx512cd"),
        "avx512vl" => has!("avx512vl"),
        "avx512dq" => has!("avx512dq"),
        "avx512bw" => has!("avx512bw"),
        "avx512vbmi" => has!("avx512vbmi"),
        "avx512vnni" => has!("avx512vnni"),
        "avx512bf16" => has!("avx512bf16"),
        "avxvnni" => has!("avxvnni"),
        "amx-tile" | "amx-int8" => false,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_FILES: [&str; 15] = [
        "libggml-cpu-x64.so",
        "libggml-cpu-sse42.so",
        "libggml-cpu-sandybridge.so",
        "libggml-cpu-ivybridge.so",
        "libggml-cpu-piledriver.so",
        "libggml-cpu-haswell.so",
        "libggml-cpu-skylakex.so",
        "libggml-cpu-cannonlake.so",
        "libggml-cpu-cascadelake.so",
        "libggml-cpu-icelake.so",
        "libggml-cpu-cooperlake.so",
        "libggml-cpu-zen4.so",
        "libggml-cpu-alderlake.so",
        "libggml-cpu-sapphirerapids.so",
        "libggml-cpu-armv9.2_2.so",
    ];

    fn host(features: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |f| features.contains(&f)
    }

    #[test]
    fn the_best_variant_the_cpu_and_os_run_is_chosen() {
        let haswell = &HASWELL;
        assert_eq!(
            choose_x86_variant(&ALL_FILES, host(haswell)),
            Some("libggml-cpu-haswell.so")
        );
        // A Sapphire Rapids host: AMX and every AVX-512 extension.
        let spr = X86_VARIANTS[13].1;
        assert_eq!(
            choose_x86_variant(&ALL_FILES, host(spr)),
            Some("libggml-cpu-sapphirerapids.so")
        );
        // The same CPU without AMX: zen4 has the same AVX-512 set.
        let no_amx: &'static [&'static str] = &[
            "sse4.2",
            "avx",
            "f16c",
            "fma",
            "avx2",
            "bmi2",
            "avx512f",
            "avx512cd",
            "avx512vl",
            "avx512dq",
            "avx512bw",
            "avx512vbmi",
            "avx512vnni",
            "avx512bf16",
        ];
        assert_eq!(
            choose_x86_variant(&ALL_FILES, host(no_amx)),
            Some("libggml-cpu-zen4.so")
        );
        // AVX-512 without BW (Knights Landing-like): not skylakex.
        let partial: &'static [&'static str] = &[
            "sse4.2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512cd",
        ];
        assert_eq!(
            choose_x86_variant(&ALL_FILES, host(partial)),
            Some("libggml-cpu-haswell.so")
        );
        // Alder Lake: AVX-VNNI without AVX-512 ranks above haswell.
        let adl: &'static [&'static str] =
            &["sse4.2", "avx", "f16c", "fma", "avx2", "bmi2", "avxvnni"];
        assert_eq!(
            choose_x86_variant(&ALL_FILES, host(adl)),
            Some("libggml-cpu-alderlake.so")
        );
        // Only what is in the folder counts; unknown names are skipped.
        assert_eq!(
            choose_x86_variant(
                &["libggml-cpu-x64.so", "libggml-cpu-armv9.2_2.so"],
                host(haswell)
            ),
            Some("libggml-cpu-x64.so")
        );
        assert_eq!(
            choose_x86_variant(&["libggml-cpu-zen4.so"], host(haswell)),
            None
        );
    }

    #[test]
    fn plugins_are_split_from_the_core_libraries() {
        let names = [
            "libggml-cpu-zen4.so",
            "libggml-base.so",
            "libggml-base.so.0",
            "libggml.so",
            "libllama.so.0.6.0",
            "libggml-cuda.so",
            "libggml-cpu-haswell.so",
            "internvl-grpc",
        ];
        let (cpu, others) = plugins_in(names.map(String::from));
        assert_eq!(cpu, ["libggml-cpu-haswell.so", "libggml-cpu-zen4.so"]);
        assert_eq!(others, ["libggml-cuda.so"]);
    }

    #[test]
    fn ranks_follow_ggmls_score() {
        let rank = |name: &str| x86_rank(X86_VARIANTS.iter().find(|(v, _)| *v == name).unwrap().1);
        assert_eq!(rank("x64"), 1);
        // 1 + FMA 1 + F16C 2 + SSE42 4 + BMI2 8 + AVX 16 + AVX2 32
        assert_eq!(rank("haswell"), 64);
        assert_eq!(rank("skylakex"), 64 + 128);
        assert_eq!(rank("sapphirerapids"), 64 + 128 + 256 + 512 + 1024 + 2048);
        assert!(rank("alderlake") > rank("haswell") && rank("alderlake") < rank("skylakex"));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn this_host_runs_at_least_what_the_default_build_uses() {
        // The default build's kernels are AVX2 (README "CPU kernels"); CI's
        // machines run them, so they run haswell too.
        assert!(HASWELL.iter().all(|f| x86_supported(f)));
        assert!(!x86_supported("not-a-feature"));
    }
}
