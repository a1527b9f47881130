//! Sampling parameters of a request and their validation.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the repetition penalty (llama.cpp's multiplicative form).
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition, presence and frequency penalties see.
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// None draws a seed from the operating system.
    pub seed: Option<u64>,
    /// Added to the logits of the given tokens before sampling.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, ..SamplingParams::default() }
    }

    /// Checks every field's range; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let check = |name: &'static str, value: f32, ok: bool, range: &'static str| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(InvalidParam { name, value: value.to_string(), range })
            }
        };
        check("temperature", self.temperature, (0.0..=100.0).contains(&self.temperature), "0 to 100")?;
        check("top_p", self.top_p, self.top_p > 0.0 && self.top_p <= 1.0, "greater than 0, at most 1")?;
        check("min_p", self.min_p, (0.0..=1.0).contains(&self.min_p), "0 to 1")?;
        check("repeat_penalty", self.repeat_penalty, self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0, "greater than 0, at most 10")?;
        check("presence_penalty", self.presence_penalty, (-2.0..=2.0).contains(&self.presence_penalty), "-2 to 2")?;
        check("frequency_penalty", self.frequency_penalty, (-2.0..=2.0).contains(&self.frequency_penalty), "-2 to 2")?;
        for &(_, bias) in &self.logit_bias {
            check("logit_bias", bias, (-100.0..=100.0).contains(&bias), "-100 to 100")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{name} = {value} is out of range ({range})")]
pub struct InvalidParam {
    pub name: &'static str,
    pub value: String,
    pub range: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_field() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
        let err = SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(err.name, "top_p");
        let err = SamplingParams { temperature: f32::NAN, ..Default::default() }.validate().unwrap_err();
        assert_eq!(err.name, "temperature");
    }
}
