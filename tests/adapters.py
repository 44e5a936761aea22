"""A LoRA adapter for a tiny test model, made with peft and saved as a trained one is
(adapter_config.json + adapter_model.safetensors), with random non-zero B weights so it
changes the model's output (a fresh LoRA's B is zero, which changes nothing)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_lora(base: Path, dest: Path, *, seed: int = 0, rank: int = 8) -> Path:
    """Writes a rank-``rank`` LoRA on the attention and MLP projections of the model in
    ``base`` into ``dest`` and returns ``dest``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(dest)
    return dest
