//! The one table between Hugging Face tensor names (which model code uses) and GGUF names.

/// GGUF name of a Hugging Face tensor name, for architecture `arch` (`clip`: the vision side
/// of a llama.cpp `mmproj` file, named as kiln's vision encoders ask for it).
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    if arch == "clip" {
        return clip_name(hf);
    }
    let global = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = global.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (index, suffix) = rest.split_once('.')?;
    let layer: usize = index.parse().ok()?;
    // Gemma 2/3 put a norm after attention and a pair around the MLP; in Llama-style models
    // `post_attention_layernorm` is the norm *before* the MLP.
    let sandwich = matches!(arch, "gemma2" | "gemma3");
    let part = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" if sandwich => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        // Mixture of experts: the router, and every expert's matrices merged in one tensor
        // (these merged names exist only in GGUF files).
        "mlp.gate.weight" | "block_sparse_moe.gate.weight" => "ffn_gate_inp.weight",
        "mlp.experts.gate_proj.weight" => "ffn_gate_exps.weight",
        "mlp.experts.up_proj.weight" => "ffn_up_exps.weight",
        "mlp.experts.down_proj.weight" => "ffn_down_exps.weight",
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

/// llama.cpp's mmproj names for Gemma 3's SigLIP tower and projector.
fn clip_name(hf: &str) -> Option<String> {
    let fixed = [
        ("vision_tower.embeddings.patch_embedding.weight", "v.patch_embd.weight"),
        ("vision_tower.embeddings.patch_embedding.bias", "v.patch_embd.bias"),
        ("vision_tower.embeddings.position_embedding.weight", "v.position_embd.weight"),
        ("vision_tower.post_layernorm.weight", "v.post_ln.weight"),
        ("vision_tower.post_layernorm.bias", "v.post_ln.bias"),
        ("multi_modal_projector.mm_input_projection_weight", "mm.input_projection.weight"),
        ("multi_modal_projector.mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("vision_tower.encoder.layers.")?;
    let (index, suffix) = rest.split_once('.')?;
    let layer: usize = index.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let part = match module {
        "layer_norm1" => "ln1",
        "layer_norm2" => "ln2",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.out_proj" => "attn_out",
        "mlp.fc1" => "ffn_up",
        "mlp.fc2" => "ffn_down",
        _ => return None,
    };
    Some(format!("v.blk.{layer}.{part}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn maps_llama_and_gemma_names() {
        assert_eq!(gguf_name("llama", "model.layers.3.self_attn.q_proj.weight").unwrap(), "blk.3.attn_q.weight");
        assert_eq!(gguf_name("llama", "model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.ffn_norm.weight");
        assert_eq!(gguf_name("gemma3", "model.layers.0.post_attention_layernorm.weight").unwrap(), "blk.0.post_attention_norm.weight");
        assert_eq!(gguf_name("gemma3", "model.layers.1.pre_feedforward_layernorm.weight").unwrap(), "blk.1.ffn_norm.weight");
        assert_eq!(gguf_name("llama", "model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(gguf_name("llama", "model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("llama", "model.layers.2.mystery.weight"), None);
    }
}
