//! Shared by the speed examples.

/// Reproducible values in [-0.5, 0.5) (xorshift), for weights, activations, keys and values.
pub fn uniform() -> impl FnMut() -> f32 {
    let mut seed = 0x9e3779b97f4a7c15u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}
