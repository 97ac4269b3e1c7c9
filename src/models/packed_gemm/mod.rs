//! `y = x Wᵀ + b` against an f32 weight matrix that never changes (the
//! BERT encoder's layers, and the projections of f32 decoder checkpoints):
//! the weights are packed once, at load, into panels of 32 output columns
//! laid out k-major, so the AVX-512 microkernel reads each panel as one
//! contiguous stream and keeps up to 12 rows × 32 columns of sums in
//! registers. Every output is the bias plus its products added in input
//! order with FMAs, whatever the kernel, tile or number of rows, so a row
//! computed alone gives the bits it gives among others (a decode step
//! matches the prompt pass that stored the same token). Checkpoints in
//! bf16 or f16 keep their 16-bit weights (half the memory, and half the
//! bytes a decode step reads); the kernels widen them in registers, which
//! is exact, so the products are those of the f32 values. Where AVX2 is
//! missing the `gemm` crate computes the product from the unpacked matrix.

use super::spin_pool::for_each_task;

#[cfg(target_arch = "x86_64")]
mod kernels;
#[cfg(target_arch = "x86_64")]
use kernels::{avx2, avx512};

/// Output columns per panel: two 16-lane registers.
const PANEL: usize = 32;
/// Rows of `x` per microkernel call.
const TILE_ROWS: usize = 12;
/// Rows of `x` a task takes (several tiles, so a panel is reused from cache).
const TASK_ROWS: usize = 96;

/// The microkernel that reads packed panels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedKernel {
    /// 12 rows × 32 columns of sums in 24 zmm registers.
    Avx512,
    /// 6 rows × 16 columns in 12 ymm registers, four passes per tile.
    Avx2,
}

impl PackedKernel {
    fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Avx512 => is_x86_feature_detected!("avx512f"),
                Self::Avx2 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// The packed kernel this CPU runs: AVX-512 where present, else AVX2;
/// `QPAI_CPU_KERNELS` caps it as it caps the quantized kernels (`avx2` and
/// `avx-vnni` give AVX2, `scalar` none: the `gemm` crate computes the
/// products). Decided once per process.
pub fn packed_kernel() -> Option<PackedKernel> {
    static KERNEL: std::sync::OnceLock<Option<PackedKernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let asked = std::env::var("QPAI_CPU_KERNELS").ok();
        let allowed: &[PackedKernel] = match asked.as_deref() {
            Some("scalar") => &[],
            Some("avx2" | "avx-vnni") => &[PackedKernel::Avx2],
            _ => &[PackedKernel::Avx512, PackedKernel::Avx2],
        };
        allowed.iter().copied().find(|k| k.supported())
    })
}

/// A weight matrix as a checkpoint holds it: f32, or the bits of bf16 or
/// f16 values.
pub enum DenseWeights {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl DenseWeights {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) | Self::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The matrices one after the other, if they are all of one type.
    pub fn concat(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        let kind = std::mem::discriminant(*first);
        if parts.iter().any(|p| std::mem::discriminant(*p) != kind) {
            return None;
        }
        let halves = || -> Vec<u16> {
            parts
                .iter()
                .flat_map(|p| match p {
                    Self::Bf16(v) | Self::F16(v) => v.as_slice(),
                    Self::F32(_) => &[],
                })
                .copied()
                .collect()
        };
        Some(match first {
            Self::F32(_) => Self::F32(
                parts
                    .iter()
                    .flat_map(|p| match p {
                        Self::F32(v) => v.as_slice(),
                        _ => &[],
                    })
                    .copied()
                    .collect(),
            ),
            Self::Bf16(_) => Self::Bf16(halves()),
            Self::F16(_) => Self::F16(halves()),
        })
    }

    /// These `[outputs, inputs]` row-major weights in panel order, same type.
    fn in_panel_order(&self, outputs: usize, inputs: usize) -> Self {
        match self {
            Self::F32(w) => Self::F32(panel_order(outputs, inputs, |o, k| w[o * inputs + k])),
            Self::Bf16(w) => Self::Bf16(panel_order(outputs, inputs, |o, k| w[o * inputs + k])),
            Self::F16(w) => Self::F16(panel_order(outputs, inputs, |o, k| w[o * inputs + k])),
        }
    }

    /// Element `i`, widened to f32 (exactly).
    fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::Bf16(v) => half::bf16::from_bits(v[i]).to_f32(),
            Self::F16(v) => half::f16::from_bits(v[i]).to_f32(),
        }
    }
}

/// The kernels' code for each element type (a const parameter).
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// `[panels][inputs][PANEL]` from element (output o, input k) `at(o, k)`,
/// zero past `outputs`.
fn panel_order<T: Copy + Default>(
    outputs: usize,
    inputs: usize,
    at: impl Fn(usize, usize) -> T,
) -> Vec<T> {
    let mut data = vec![T::default(); outputs.div_ceil(PANEL) * inputs * PANEL];
    for o in 0..outputs {
        let (panel, column) = (o / PANEL, o % PANEL);
        for k in 0..inputs {
            data[(panel * inputs + k) * PANEL + column] = at(o, k);
        }
    }
    data
}

/// A right-hand matrix `B` (`[outputs, inputs]`) packed for the
/// microkernels: `[panels][inputs][PANEL]`, zero-padded past `outputs`.
pub struct Panels {
    /// f32, or 16-bit values the kernels widen.
    data: DenseWeights,
    inputs: usize,
    outputs: usize,
    kernel: PackedKernel,
}

impl Panels {
    /// Packs the matrix whose element (output o, input k) is `at(o, k)`,
    /// for `kernel` (which the CPU must support).
    pub fn pack(
        kernel: PackedKernel,
        outputs: usize,
        inputs: usize,
        at: impl Fn(usize, usize) -> f32,
    ) -> Self {
        let data = DenseWeights::F32(panel_order(outputs, inputs, at));
        Self::new(kernel, data, inputs, outputs)
    }

    /// Packs `[outputs, inputs]` row-major weights, keeping their type.
    fn pack_dense(
        kernel: PackedKernel,
        weights: &DenseWeights,
        outputs: usize,
        inputs: usize,
    ) -> Self {
        Self::new(
            kernel,
            weights.in_panel_order(outputs, inputs),
            inputs,
            outputs,
        )
    }

    fn new(kernel: PackedKernel, data: DenseWeights, inputs: usize, outputs: usize) -> Self {
        assert!(kernel.supported(), "{kernel:?} is not supported here");
        Self {
            data,
            inputs,
            outputs,
            kernel,
        }
    }

    /// The first byte of panel `panel`, and the element type's code.
    fn panel_start(&self, panel: usize) -> (*const u8, u8) {
        let at = panel * self.inputs * PANEL;
        match &self.data {
            DenseWeights::F32(d) => (d[at..].as_ptr() as *const u8, F32),
            DenseWeights::Bf16(d) => (d[at..].as_ptr() as *const u8, BF16),
            DenseWeights::F16(d) => (d[at..].as_ptr() as *const u8, F16),
        }
    }

    /// Element (output o, input k), widened to f32.
    fn get(&self, o: usize, k: usize) -> f32 {
        self.data
            .get(((o / PANEL) * self.inputs + k) * PANEL + o % PANEL)
    }

    fn count(&self) -> usize {
        self.outputs.div_ceil(PANEL)
    }

    /// `out = x · Bᵀ (+ bias)`: `x` is `[rows, inputs]`, `out` `[rows,
    /// outputs]`, `bias` (if any) one value per output, padded to whole
    /// panels. Tasks are row blocks of `TASK_ROWS`; with few rows the panels
    /// are split between tasks instead, so short inputs use every thread
    /// too. Without `parallel` it all runs on the calling thread.
    pub fn multiply(&self, x: &[f32], bias: Option<&[f32]>, out: &mut [f32], parallel: bool) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        let rows = x.len() / inputs;
        assert_eq!(rows * inputs, x.len(), "input width");
        assert_eq!(out.len(), rows * outputs, "output shape");
        let panel_count = self.count();
        let zeros = [0f32; PANEL];
        if let Some(bias) = bias {
            assert_eq!(
                bias.len(),
                panel_count * PANEL,
                "bias padded to whole panels"
            );
        }
        let row_blocks = rows.div_ceil(TASK_ROWS);
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let panel_groups = (threads * 2)
            .div_ceil(row_blocks)
            .clamp(1, panel_count.max(1));
        let panels_per_group = panel_count.div_ceil(panel_groups);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let task = |task: usize| {
            let (block, group) = (task / panel_groups, task % panel_groups);
            let first_row = block * TASK_ROWS;
            let block_rows = TASK_ROWS.min(rows - first_row);
            let first_panel = group * panels_per_group;
            let last_panel = (first_panel + panels_per_group).min(panel_count);
            // The block's rows, packed tile by tile as [k][TILE_ROWS] (zeros
            // past the last row), so the kernel broadcasts from one stream.
            let tiles = block_rows.div_ceil(TILE_ROWS);
            let mut packed = vec![0f32; tiles * inputs * TILE_ROWS];
            for (r, row) in x[first_row * inputs..][..block_rows * inputs]
                .chunks(inputs)
                .enumerate()
            {
                let tile = &mut packed[(r / TILE_ROWS) * inputs * TILE_ROWS..];
                for (k, &v) in row.iter().enumerate() {
                    tile[k * TILE_ROWS + r % TILE_ROWS] = v;
                }
            }
            for panel in first_panel..last_panel {
                let columns = PANEL.min(outputs - panel * PANEL);
                let bias = bias.map_or(zeros.as_ptr(), |b| b[panel * PANEL..].as_ptr());
                for tile in 0..tiles {
                    let row = first_row + tile * TILE_ROWS;
                    let tile_rows = TILE_ROWS.min(first_row + block_rows - row);
                    let (weights, element) = self.panel_start(panel);
                    let tile_kernel = tile_kernel(self.kernel, tile_rows, element);
                    // SAFETY: the kernel's instructions are present (checked
                    // when the panels were packed); the tile
                    // reads inputs × TILE_ROWS packed floats, one panel of
                    // inputs × PANEL elements of the type it is built for
                    // and PANEL bias values, and writes
                    // rows row..row+tile_rows, columns panel·PANEL..+columns
                    // of out (checked shape), a region no other task writes:
                    // tasks differ in row block or panel group.
                    unsafe {
                        tile_kernel(
                            packed.as_ptr().add(tile * inputs * TILE_ROWS),
                            inputs,
                            weights,
                            bias,
                            out_ptr.get().add(row * outputs + panel * PANEL),
                            outputs,
                            tile_rows,
                            columns,
                        );
                    }
                }
            }
        };
        let tasks = row_blocks * panel_groups;
        if parallel {
            for_each_task(tasks, task);
        } else {
            (0..tasks).for_each(task);
        }
    }
}

/// A tile kernel: see `avx512::tile`.
type TileFn = unsafe fn(*const f32, usize, *const u8, *const f32, *mut f32, usize, usize, usize);

/// The kernel for a tile of `rows` rows against panels of `element`s: as
/// few rows of sums as the tile has (a decode step's single row computes
/// one, not twelve).
fn tile_kernel(kernel: PackedKernel, rows: usize, element: u8) -> TileFn {
    macro_rules! by_rows {
        ($module:ident, $e:expr, $many:expr) => {
            match rows {
                1 => $module::tile::<1, $e> as TileFn,
                2..=4 => $module::tile::<4, $e>,
                _ => $module::tile::<$many, $e>,
            }
        };
    }
    match (kernel, element) {
        (PackedKernel::Avx512, F32) => by_rows!(avx512, F32, TILE_ROWS),
        (PackedKernel::Avx512, BF16) => by_rows!(avx512, BF16, TILE_ROWS),
        (PackedKernel::Avx512, _) => by_rows!(avx512, F16, TILE_ROWS),
        (PackedKernel::Avx2, F32) => by_rows!(avx2, F32, 6),
        (PackedKernel::Avx2, BF16) => by_rows!(avx2, BF16, 6),
        (PackedKernel::Avx2, _) => by_rows!(avx2, F16, 6),
    }
}

/// The weights of a `PackedLinear`: packed for this CPU's kernel, or as
/// given for the `gemm` crate where there is none.
enum Layout {
    Packed(Panels),
    /// `[outputs, inputs]`, row-major.
    RowMajor(Vec<f32>),
}

pub struct PackedLinear {
    layout: Layout,
    /// The bias, zero-padded to whole panels.
    bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

impl PackedLinear {
    /// `weight` is `[outputs, inputs]` row-major, `bias` has `outputs` values.
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, inputs: usize, outputs: usize) -> Self {
        Self::with_kernel(
            DenseWeights::F32(weight),
            bias,
            inputs,
            outputs,
            packed_kernel(),
        )
    }

    /// `new` for weights of any checkpoint type, kept in that type where
    /// this CPU has a packed kernel (widened to f32 for the `gemm` crate).
    pub fn from_dense(weight: DenseWeights, bias: Vec<f32>, inputs: usize, outputs: usize) -> Self {
        Self::with_kernel(weight, bias, inputs, outputs, packed_kernel())
    }

    fn with_kernel(
        weight: DenseWeights,
        mut bias: Vec<f32>,
        inputs: usize,
        outputs: usize,
        kernel: Option<PackedKernel>,
    ) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "weight shape");
        assert_eq!(bias.len(), outputs, "bias shape");
        let layout = match (kernel, weight) {
            (Some(kernel), weight) => {
                Layout::Packed(Panels::pack_dense(kernel, &weight, outputs, inputs))
            }
            (None, DenseWeights::F32(weight)) => Layout::RowMajor(weight),
            (None, weight) => Layout::RowMajor((0..weight.len()).map(|i| weight.get(i)).collect()),
        };
        bias.resize(outputs.div_ceil(PANEL) * PANEL, 0.0);
        Self {
            layout,
            bias,
            inputs,
            outputs,
        }
    }

    /// `x` is `[rows, inputs]` row-major; returns `[rows, outputs]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.inputs;
        assert_eq!(rows * self.inputs, x.len(), "input width");
        let mut out = vec![0f32; rows * self.outputs];
        match &self.layout {
            Layout::Packed(panels) => panels.multiply(x, Some(&self.bias), &mut out, true),
            Layout::RowMajor(weight) => self.forward_gemm(weight, x, &mut out, rows),
        }
        out
    }

    /// Appends the weights of output `output` (row `output` of W) in f32:
    /// a token embedding looked up in a tied output matrix.
    pub fn append_row(&self, output: usize, out: &mut Vec<f32>) {
        let inputs = self.inputs;
        match &self.layout {
            Layout::Packed(panels) => out.extend((0..inputs).map(|k| panels.get(output, k))),
            Layout::RowMajor(weight) => {
                out.extend_from_slice(&weight[output * inputs..][..inputs]);
            }
        }
    }

    fn forward_gemm(&self, weight: &[f32], x: &[f32], out: &mut [f32], rows: usize) {
        for row in out.chunks_mut(self.outputs) {
            row.copy_from_slice(&self.bias[..self.outputs]);
        }
        let threads = rayon::current_num_threads();
        let parallelism = if rows * self.outputs * self.inputs > 1 << 18 && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: out is row-major [rows, outputs], x row-major [rows, inputs]
        // and the right-hand side is Wᵀ read from W's rows ([outputs, inputs]):
        // every index the strides produce lies inside those buffers.
        unsafe {
            gemm::gemm(
                rows,
                self.outputs,
                self.inputs,
                out.as_mut_ptr(),
                1,
                self.outputs as isize,
                true,
                x.as_ptr(),
                1,
                self.inputs as isize,
                weight.as_ptr(),
                self.inputs as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// A pointer handed to tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a region of the buffer no other task touches.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests;
