//! kiln's router <-> worker contract, generated from `kiln/v1/kiln.proto`.

pub mod v1 {
    tonic::include_proto!("kiln.v1");
}

/// The sampling settings a request carries, as the engine's type (router and worker check
/// and apply them with the same rules).
pub fn sampling_params(s: &v1::SamplingParams) -> kiln_shared::sampling::SamplingParams {
    kiln_shared::sampling::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n as usize,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        logit_bias: s.logit_bias.iter().map(|b| (b.token, b.bias)).collect(),
    }
}
