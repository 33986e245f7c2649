"""Produces tests/data/lora_peft/: a checkpoint saved as the ORIGINAL saves a LoRA fine-tune, plus the
outputs of the peft-wrapped model, for tests/reference_model/test_lora_loading.py (which needs no peft).

Run once in an environment with peft (here peft 0.21.2, torch 2.13.0 CPU):
    PYTHONPATH=$PWD /work/venvs/i13-peft/bin/python tests/data/make_lora_fixture.py tests/data/lora_peft

As the original's InternVLModel.__init__ (internvl_g internvl_stage2): both towers wrapped with
get_peft_model(LoraConfig(r, lora_alpha=2*r, lora_dropout=0.05, target_modules=...)), then the
position embeddings resized to force_image_size; the fine-tuned state dict (peft key names,
`base_layer` with peft >= 0.7) saved as bf16 safetensors in two shards with an index. lora_B is
random (peft initialises it to zero, which would hide every mistake in merging).
"""
import json
import sys
from pathlib import Path

import numpy as np
import peft
import torch
from peft import LoraConfig, get_peft_model

from bridge_export import reference_model
from bridge_export.reference_model.config import InternVLConfig, QLlamaConfig, VisionConfig
from bridge_export.reference_model.loading import init_weights

R = 4
VISION_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
QLLAMA_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"]


def config() -> InternVLConfig:
    """A minimal InternVL-14B-shaped config: LoRA on both towers, 16-px positions forced to 24 px."""
    return InternVLConfig(
        vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64),
        qllama=QLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=64),
        num_query_token=4, clip_embed_dim=16, attn_pool_num_heads=2, tie_word_embeddings=False,
        force_image_size=24, use_backbone_lora=R, use_qllama_lora=R)


def round_bf16(model: torch.nn.Module) -> None:
    """Round every weight to bf16 (the published dtype) and keep computing in fp32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def main(out: Path) -> None:
    torch.manual_seed(0)
    cfg = config()
    model = reference_model.InternVLModel(cfg)  # builds at 16 px and resizes positions to 24 px
    init_weights(model, seed=0)
    lora = dict(r=R, lora_alpha=2 * R, lora_dropout=0.05)
    # get_peft_model injects LoRA layers into the tower in place; the reference keeps running the same
    # (now adapted) modules, while the original's attribute holds the PeftModel, whose names are saved.
    peft_vision = get_peft_model(model.vision_model, LoraConfig(target_modules=VISION_TARGETS, **lora))
    peft_qllama = get_peft_model(model.qllama, LoraConfig(target_modules=QLLAMA_TARGETS, **lora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in list(peft_vision.named_parameters()) + list(peft_qllama.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    round_bf16(model)
    model.eval()
    vision, qllama = model.vision_model, model.qllama
    model.vision_model, model.qllama = peft_vision, peft_qllama
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.vision_model, model.qllama = vision, qllama

    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(out / name), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 24, 24, generator=g)
    ids = torch.tensor([[1, 5, 9, 2, 0], [1, 7, 8, 9, 2]])
    prompt = torch.tensor([[1, 11, 12], [1, 13, 14]])
    with torch.no_grad():
        expected = {
            "pixel_values": pixels.numpy(), "text_ids": ids.numpy(), "prompt_ids": prompt.numpy(),
            "image_c": model.encode_image(pixels, "InternVL-C").numpy(),
            "image_g": model.encode_image(pixels, "InternVL-G").numpy(),
            "text": model.encode_text(ids).numpy(),
            "tokens": model.generate(pixels, prompt, max_new_tokens=8).numpy(),
            "logits": model.forward(pixels, ids, "InternVL-G")[0].numpy(),
            "peft_version": np.array(peft.__version__), "torch_version": np.array(torch.__version__),
        }
    np.savez_compressed(out / "expected.npz", **expected)
    lora_keys = [k for k in state if "lora_" in k]
    print(f"wrote {out}: {len(state)} tensors ({len(lora_keys)} LoRA), {total} bytes; e.g. {lora_keys[0]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
