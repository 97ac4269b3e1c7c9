//! Which kernels this CPU runs, chosen once at run time from its features
//! (the binary is built for x86-64-v3, so AVX2 is the floor on x86), and the
//! kernel table of each level. `QPAI_CPU_KERNELS` picks a level by name, to
//! measure or test another one the CPU supports.

use std::sync::OnceLock;

use super::Rows4;
use super::blocks::{BlockQ4_1, BlockQ4K32, BlockQ5_0, BlockQ6K32, BlockQ8_0, QuantBlock};
use super::panel::{PanelKernel, PanelShape};

/// Kernel levels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuLevel {
    /// Plain Rust: the reference, and the fallback off x86.
    Scalar,
    Avx2,
    /// AVX2 with the 256-bit VNNI dot product (Alder Lake, Zen 5 without AVX-512).
    AvxVnni,
    /// AVX-512 F/BW with VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later):
    /// panels on the 256-bit EVEX `vpdpbusd` (with VL), rows on AVX2.
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
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
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

    /// Levels in the order they are preferred. Every level's kernels give
    /// the same bits (exact integer block sums, scales added in one order),
    /// so the choice is speed only: the panel kernels use 256-bit
    /// `vpdpbusd`, in its VEX form (AVX-VNNI) or its EVEX form (AVX-512 VNNI
    /// with VL); the row kernels are AVX-VNNI's or AVX2's.
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

    /// The prefill panel kernel of this level for panels of `shape`; none
    /// on AVX2 for quants its 16-bit pair sums could overflow with, or on
    /// AVX-512 CPUs without the 256-bit (VL) forms.
    pub(super) fn panel_kernel(self, shape: PanelShape, narrow: bool) -> Option<PanelKernel> {
        macro_rules! pick {
            ($kernel:ident) => {
                match (shape.split, shape.offset) {
                    (false, false) => $kernel::<false, false> as PanelKernel,
                    (false, true) => $kernel::<false, true>,
                    (true, false) => $kernel::<true, false>,
                    (true, true) => $kernel::<true, true>,
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        {
            use super::panel::x86::{avx2_gemm, avx512_gemm, vnni_gemm};
            match self {
                Self::Scalar => {}
                Self::Avx2 => return narrow.then_some(pick!(avx2_gemm)),
                Self::AvxVnni => return Some(pick!(vnni_gemm)),
                Self::Avx512Vnni => {
                    return is_x86_feature_detected!("avx512vl").then(|| pick!(avx512_gemm));
                }
            }
        }
        let _ = narrow;
        use super::panel::scalar_kernel;
        Some(pick!(scalar_kernel))
    }
}

/// A level's four-row kernel for a block type; `None` runs the reference
/// row by row (which gives the same bits).
pub(super) trait RowKernels: QuantBlock {
    fn rows4(level: CpuLevel) -> Option<Rows4<Self>>;
}

macro_rules! row_kernels {
    ($block:ty, $kernel:ident) => {
        impl RowKernels for $block {
            fn rows4(level: CpuLevel) -> Option<Rows4<Self>> {
                #[cfg(target_arch = "x86_64")]
                {
                    use super::avx2::{avx_vnni, avx2};
                    // SAFETY (each closure): a level is only used once
                    // `supported` said the CPU has its features, and every
                    // level above scalar has AVX2 and FMA.
                    match level {
                        CpuLevel::Scalar => None,
                        CpuLevel::Avx2 | CpuLevel::Avx512Vnni => {
                            Some(|w, per_row, a| unsafe { avx2::$kernel(w, per_row, a) })
                        }
                        CpuLevel::AvxVnni => {
                            Some(|w, per_row, a| unsafe { avx_vnni::$kernel(w, per_row, a) })
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = level;
                    None
                }
            }
        }
    };
}

row_kernels!(BlockQ4_1, rows4_q4_1);
row_kernels!(BlockQ4K32, rows4_q4_k);
row_kernels!(BlockQ5_0, rows4_q5_0);
row_kernels!(BlockQ8_0, rows4_q8_0);
row_kernels!(BlockQ6K32, rows4_q6_k);
