//! Which kernels this CPU runs, chosen once at run time from its features
//! (the binary is built for x86-64-v3, so AVX2 is the floor on x86), and the
//! kernel table of each level. `QPAI_CPU_KERNELS` picks a level by name, to
//! measure or test another one the CPU supports.

use std::sync::OnceLock;

use super::blocks::{self, ActivationBlock, BlockQ5_0, BlockQ6K32, BlockQ8_0, Nibbles};
use super::{Dot4, Kernel, Rows4};

/// Kernel levels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuLevel {
    /// Plain Rust: the reference, and the fallback off x86.
    Scalar,
    Avx2,
    /// AVX2 with the 256-bit VNNI dot product (Alder Lake, Zen 5 without AVX-512).
    AvxVnni,
    /// AVX-512 F/BW with VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512Vnni,
}

impl CpuLevel {
    pub const ALL: [CpuLevel; 4] = [
        CpuLevel::Scalar,
        CpuLevel::Avx2,
        CpuLevel::AvxVnni,
        CpuLevel::Avx512Vnni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::AvxVnni => "avx-vnni",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU can run the level's kernels.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                Self::Scalar => true,
                Self::Avx2 => avx2,
                Self::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                Self::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Scalar
        }
    }

    /// Levels in the order they are preferred. The 256-bit VNNI kernels come
    /// first: on a Xeon that has both, they decoded 100-107 tok/s against
    /// 70-86 for the 512-bit ones, and prefilled faster too (docs/perf.md).
    pub const PREFERRED: [CpuLevel; 4] = [
        CpuLevel::AvxVnni,
        CpuLevel::Avx512Vnni,
        CpuLevel::Avx2,
        CpuLevel::Scalar,
    ];

    /// The level the kernels use: the one `QPAI_CPU_KERNELS` names when the
    /// CPU supports it, else the first supported of `PREFERRED`; decided
    /// once per process.
    pub fn current() -> Self {
        static LEVEL: OnceLock<CpuLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let asked = std::env::var("QPAI_CPU_KERNELS").ok();
            let asked = asked.as_deref().and_then(|name| {
                let found = Self::ALL
                    .into_iter()
                    .find(|l| l.name() == name && l.supported());
                if found.is_none() {
                    tracing::warn!(
                        name,
                        "QPAI_CPU_KERNELS names no level this CPU runs; ignored"
                    );
                }
                found
            });
            let level = asked
                .or_else(|| Self::PREFERRED.into_iter().find(|l| l.supported()))
                .unwrap_or(Self::Scalar);
            tracing::info!(kernels = level.name(), "quantized matmul kernels");
            level
        })
    }

    /// Kernels for blocks of nibbles: Q4_1, and Q4_K repacked.
    pub(super) fn q4<B: Nibbles>(self) -> Kernel<B> {
        #[cfg(not(target_arch = "x86_64"))]
        return scalar(blocks::dot_q4_1);
        #[cfg(target_arch = "x86_64")]
        match self {
            Self::Scalar => scalar(blocks::dot_q4_1),
            Self::Avx2 => with_rows4(
                kernel(x86::avx2_dot_q4_1::<B>, Some(x86::avx2_dot4_q4_1::<B>)),
                x86::avx2_rows4_q4_1::<B>,
            ),
            Self::AvxVnni => with_rows4(
                kernel(x86::vnni_dot_q4_1::<B>, Some(x86::vnni_dot4_q4_1::<B>)),
                x86::vnni_rows4_q4_1::<B>,
            ),
            Self::Avx512Vnni => with_rows4(
                kernel(x86::avx512_dot_q4_1::<B>, Some(x86::avx512_dot4_q4_1::<B>)),
                x86::avx512_rows4_q4_1::<B>,
            ),
        }
    }

    pub(super) fn q5_0(self) -> Kernel<BlockQ5_0> {
        #[cfg(not(target_arch = "x86_64"))]
        return scalar(blocks::dot_q5_0);
        #[cfg(target_arch = "x86_64")]
        match self {
            Self::Scalar => scalar(blocks::dot_q5_0),
            Self::Avx2 => with_rows4(
                kernel(x86::avx2_dot_q5_0, Some(x86::avx2_dot4_q5_0)),
                x86::avx2_rows4_q5_0,
            ),
            Self::AvxVnni => with_rows4(
                kernel(x86::vnni_dot_q5_0, Some(x86::vnni_dot4_q5_0)),
                x86::vnni_rows4_q5_0,
            ),
            Self::Avx512Vnni => kernel(x86::avx512_dot_q5_0, Some(x86::avx512_dot4_q5_0)),
        }
    }

    /// Kernels for Q6_K repacked. The AVX-512 level runs the AVX2 ones
    /// (every CPU with AVX-512 VNNI has AVX2).
    pub(super) fn q6_k(self) -> Kernel<BlockQ6K32> {
        #[cfg(not(target_arch = "x86_64"))]
        return scalar(blocks::dot_q6_k);
        #[cfg(target_arch = "x86_64")]
        match self {
            Self::Scalar => scalar(blocks::dot_q6_k),
            Self::Avx2 | Self::Avx512Vnni => with_rows4(
                kernel(x86::avx2_dot_q6_k, Some(x86::avx2_dot4_q6_k)),
                x86::avx2_rows4_q6_k,
            ),
            Self::AvxVnni => with_rows4(
                kernel(x86::vnni_dot_q6_k, Some(x86::vnni_dot4_q6_k)),
                x86::vnni_rows4_q6_k,
            ),
        }
    }

    pub(super) fn q8_0(self) -> Kernel<BlockQ8_0> {
        #[cfg(not(target_arch = "x86_64"))]
        return scalar(blocks::dot_q8_0);
        #[cfg(target_arch = "x86_64")]
        match self {
            Self::Scalar => scalar(blocks::dot_q8_0),
            Self::Avx2 => with_rows4(kernel(x86::avx2_dot_q8_0, None), x86::avx2_rows4_q8_0),
            Self::AvxVnni => with_rows4(kernel(x86::vnni_dot_q8_0, None), x86::vnni_rows4_q8_0),
            Self::Avx512Vnni => with_rows4(
                kernel(x86::avx512_dot_q8_0, Some(x86::avx512_dot4_q8_0)),
                x86::avx512_rows4_q8_0,
            ),
        }
    }
}

fn scalar<B>(dot: fn(&[B], &[ActivationBlock]) -> f32) -> Kernel<B> {
    Kernel {
        dot,
        dot4: None,
        rows4: None,
    }
}

fn kernel<B>(dot: fn(&[B], &[ActivationBlock]) -> f32, dot4: Option<Dot4<B>>) -> Kernel<B> {
    Kernel {
        dot,
        dot4,
        rows4: None,
    }
}

fn with_rows4<B>(kernel: Kernel<B>, rows4: Rows4<B>) -> Kernel<B> {
    Kernel {
        rows4: Some(rows4),
        ..kernel
    }
}

/// Safe entry points to the `#[target_feature]` kernels. Each is only put in
/// a level's table, and a level is only used once `supported` said the CPU
/// has its features; that is the safety argument of every `unsafe` below.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::avx2::{avx_vnni, avx2};
    use super::super::avx512;
    use super::{ActivationBlock, BlockQ5_0, BlockQ6K32, BlockQ8_0, Nibbles};

    /// Entry points generic over the nibble block type.
    macro_rules! nibbles_entry {
        ($name:ident, $module:ident :: $kernel:ident) => {
            pub fn $name<B: Nibbles>(w: &[B], a: &[ActivationBlock]) -> f32 {
                // SAFETY: see the module comment.
                unsafe { $module::$kernel::<B>(w, a) }
            }
        };
        ($name:ident, $module:ident :: $kernel:ident, rows) => {
            pub fn $name<B: Nibbles>(w: &[B], per_row: usize, a: &[ActivationBlock]) -> [f32; 4] {
                // SAFETY: see the module comment.
                unsafe { $module::$kernel::<B>(w, per_row, a) }
            }
        };
        ($name:ident, $module:ident :: $kernel:ident, 4) => {
            pub fn $name<B: Nibbles>(w: &[B], a: [&[ActivationBlock]; 4]) -> [f32; 4] {
                // SAFETY: see the module comment.
                unsafe { $module::$kernel::<B>(w, a) }
            }
        };
    }

    nibbles_entry!(avx2_dot_q4_1, avx2::dot_q4_1);
    nibbles_entry!(avx2_dot4_q4_1, avx2::dot4_q4_1, 4);
    nibbles_entry!(avx2_rows4_q4_1, avx2::rows4_q4_1, rows);
    nibbles_entry!(vnni_dot_q4_1, avx_vnni::dot_q4_1);
    nibbles_entry!(vnni_dot4_q4_1, avx_vnni::dot4_q4_1, 4);
    nibbles_entry!(vnni_rows4_q4_1, avx_vnni::rows4_q4_1, rows);
    nibbles_entry!(avx512_dot_q4_1, avx512::dot_q4_1);
    nibbles_entry!(avx512_dot4_q4_1, avx512::dot4_q4_1, 4);
    nibbles_entry!(avx512_rows4_q4_1, avx512::rows4_q4_1, rows);

    macro_rules! entry {
        ($name:ident, $kernel:path, $block:ty) => {
            pub fn $name(w: &[$block], a: &[ActivationBlock]) -> f32 {
                // SAFETY: see the module comment.
                unsafe { $kernel(w, a) }
            }
        };
        ($name:ident, $kernel:path, $block:ty, rows) => {
            pub fn $name(w: &[$block], per_row: usize, a: &[ActivationBlock]) -> [f32; 4] {
                // SAFETY: see the module comment.
                unsafe { $kernel(w, per_row, a) }
            }
        };
        ($name:ident, $kernel:path, $block:ty, 4) => {
            pub fn $name(w: &[$block], a: [&[ActivationBlock]; 4]) -> [f32; 4] {
                // SAFETY: see the module comment.
                unsafe { $kernel(w, a) }
            }
        };
    }

    entry!(avx2_dot_q5_0, avx2::dot_q5_0, BlockQ5_0);
    entry!(avx2_dot_q8_0, avx2::dot_q8_0, BlockQ8_0);
    entry!(vnni_dot_q5_0, avx_vnni::dot_q5_0, BlockQ5_0);
    entry!(vnni_dot_q8_0, avx_vnni::dot_q8_0, BlockQ8_0);
    entry!(avx2_rows4_q8_0, avx2::rows4_q8_0, BlockQ8_0, rows);
    entry!(vnni_rows4_q8_0, avx_vnni::rows4_q8_0, BlockQ8_0, rows);
    entry!(avx512_dot_q5_0, avx512::dot_q5_0, BlockQ5_0);
    entry!(avx512_dot4_q5_0, avx512::dot4_q5_0, BlockQ5_0, 4);
    entry!(avx512_dot_q8_0, avx512::dot_q8_0, BlockQ8_0);
    entry!(avx512_dot4_q8_0, avx512::dot4_q8_0, BlockQ8_0, 4);
    entry!(avx512_rows4_q8_0, avx512::rows4_q8_0, BlockQ8_0, rows);
    entry!(avx2_dot4_q5_0, avx2::dot4_q5_0, BlockQ5_0, 4);
    entry!(avx2_rows4_q5_0, avx2::rows4_q5_0, BlockQ5_0, rows);
    entry!(vnni_dot4_q5_0, avx_vnni::dot4_q5_0, BlockQ5_0, 4);
    entry!(vnni_rows4_q5_0, avx_vnni::rows4_q5_0, BlockQ5_0, rows);
    entry!(avx2_dot_q6_k, avx2::dot_q6_k, BlockQ6K32);
    entry!(avx2_dot4_q6_k, avx2::dot4_q6_k, BlockQ6K32, 4);
    entry!(avx2_rows4_q6_k, avx2::rows4_q6_k, BlockQ6K32, rows);
    entry!(vnni_dot_q6_k, avx_vnni::dot_q6_k, BlockQ6K32);
    entry!(vnni_dot4_q6_k, avx_vnni::dot4_q6_k, BlockQ6K32, 4);
    entry!(vnni_rows4_q6_k, avx_vnni::rows4_q6_k, BlockQ6K32, rows);
}
