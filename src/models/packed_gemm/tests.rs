//! Every packed kernel against a plain reference, and against each other.

use super::*;

fn reference(x: &[f32], weight: &[f32], bias: &[f32], inputs: usize) -> Vec<f32> {
    x.chunks(inputs)
        .flat_map(|row| {
            weight.chunks(inputs).zip(bias).map(move |(w, b)| {
                b + row
                    .iter()
                    .zip(w)
                    .map(|(a, w)| f64::from(a * w) as f32)
                    .sum::<f32>()
            })
        })
        .collect()
}

#[test]
fn packed_and_gemm_products_match_the_reference_at_every_shape_edge() {
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let kernels: Vec<Option<PackedKernel>> =
        [None, Some(PackedKernel::Avx2), Some(PackedKernel::Avx512)]
            .into_iter()
            .filter(|k| k.is_none_or(PackedKernel::supported))
            .collect();
    for &(rows, inputs, outputs) in &[(1, 17, 40), (13, 64, 32), (100, 33, 70), (250, 384, 96)] {
        let weight: Vec<f32> = (0..inputs * outputs).map(|_| next()).collect();
        let bias: Vec<f32> = (0..outputs).map(|_| next()).collect();
        let x: Vec<f32> = (0..rows * inputs).map(|_| next()).collect();
        let expected = reference(&x, &weight, &bias, inputs);
        for &kernel in &kernels {
            let linear = PackedLinear::with_kernel(
                DenseWeights::F32(weight.clone()),
                bias.clone(),
                inputs,
                outputs,
                kernel,
            );
            let got = linear.forward(&x);
            assert_eq!(got.len(), expected.len());
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 1e-4,
                "{kernel:?} {rows}x{inputs}x{outputs}: {worst}"
            );
            if kernel.is_none() {
                continue;
            }
            // Each row alone, and the first few rows together, give
            // the bits they give among all the rows.
            for r in [0, rows / 2, rows - 1] {
                let alone = linear.forward(&x[r * inputs..][..inputs]);
                assert_eq!(alone, got[r * outputs..][..outputs], "{kernel:?} row {r}");
            }
            let few = rows.min(3);
            assert_eq!(
                linear.forward(&x[..few * inputs]),
                got[..few * outputs],
                "{kernel:?} {few} rows"
            );
            let mut row = Vec::new();
            linear.append_row(outputs - 1, &mut row);
            assert_eq!(
                row,
                weight[(outputs - 1) * inputs..],
                "{kernel:?} row lookup"
            );
        }
        // bf16 and f16 panels compute the bits of their values in f32.
        let bits: Vec<(DenseWeights, Vec<f32>)> = vec![
            {
                let b: Vec<u16> = weight
                    .iter()
                    .map(|&w| half::bf16::from_f32(w).to_bits())
                    .collect();
                let widened = b
                    .iter()
                    .map(|&v| half::bf16::from_bits(v).to_f32())
                    .collect();
                (DenseWeights::Bf16(b), widened)
            },
            {
                let b: Vec<u16> = weight
                    .iter()
                    .map(|&w| half::f16::from_f32(w).to_bits())
                    .collect();
                let widened = b
                    .iter()
                    .map(|&v| half::f16::from_bits(v).to_f32())
                    .collect();
                (DenseWeights::F16(b), widened)
            },
        ];
        for (narrow, widened) in bits {
            for &kernel in &kernels {
                let expected = PackedLinear::with_kernel(
                    DenseWeights::F32(widened.clone()),
                    bias.clone(),
                    inputs,
                    outputs,
                    kernel,
                );
                let dense = match &narrow {
                    DenseWeights::Bf16(b) => DenseWeights::Bf16(b.clone()),
                    DenseWeights::F16(b) => DenseWeights::F16(b.clone()),
                    DenseWeights::F32(b) => DenseWeights::F32(b.clone()),
                };
                let linear =
                    PackedLinear::with_kernel(dense, bias.clone(), inputs, outputs, kernel);
                assert_eq!(
                    linear.forward(&x),
                    expected.forward(&x),
                    "{kernel:?} 16-bit"
                );
                assert_eq!(
                    linear.forward(&x[..inputs]),
                    expected.forward(&x[..inputs]),
                    "{kernel:?} 16-bit, one row"
                );
                let mut row = Vec::new();
                linear.append_row(0, &mut row);
                assert_eq!(row, widened[..inputs], "{kernel:?} 16-bit row lookup");
            }
        }
        // Every packed kernel computes the same bits.
        let packed: Vec<Vec<f32>> = kernels
            .iter()
            .flatten()
            .map(|&k| {
                PackedLinear::with_kernel(
                    DenseWeights::F32(weight.clone()),
                    bias.clone(),
                    inputs,
                    outputs,
                    Some(k),
                )
                .forward(&x)
            })
            .collect();
        assert!(packed.windows(2).all(|w| w[0] == w[1]), "kernels differ");
    }
}
