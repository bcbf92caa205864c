"""Hugging Face import/export of Llama, Qwen2, Qwen3 and GPT-NeoX (Pythia): logits equal
transformers' on random tiny weights (fp32, max |diff| < 1e-4), loading theirs into ours and
ours into theirs; single and sharded safetensors; bf16 weights; config.json both ways.
Run: python -m pytest -q tests/test_hf_families.py"""

import json

import pytest
import torch

import model as M

transformers = pytest.importorskip("transformers")

V = 101


def hf_model(family):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.GPTNeoXConfig(**common, rotary_pct=0.25)
        cls = transformers.GPTNeoXForCausalLM
    hf = cls(cfg).eval()
    for name, p in hf.named_parameters():  # norms and biases away from 1 and 0, so that they matter
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 and "norm" in name else 0.0, std=0.1 if p.dim() == 1 else 0.05)
    return cls, hf


FAMILIES = ["llama", "qwen2", "qwen3", "pythia"]


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers_both_directions(family, tmp_path):
    cls, hf = hf_model(family)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        ref = hf(x).logits
    hf.save_pretrained(tmp_path / "theirs")
    ours = M.GPT.from_pretrained(str(tmp_path / "theirs")).eval()
    assert ours.config.family == family
    diff_in = (ours(x) - ref).abs().max().item()
    ours.save_pretrained(str(tmp_path / "ours"))
    back = cls.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        diff_out = (back(x).logits - ours(x)).abs().max().item()
    print(f"{family}: theirs->ours {diff_in:.2e}, ours->theirs {diff_out:.2e}")
    assert diff_in < 1e-4 and diff_out < 1e-4
    # left padding: our position ids (real tokens only) == transformers given the same ids
    ids, mask = M.pad_left([[5, 6, 7, 8], [9, 10]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids.clamp(min=0), attention_mask=mask, position_ids=pos).logits
    assert (ours(ids, mask) - ref)[mask.bool()].abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen3", "pythia"])
def test_sharded_bf16_export_reads_back(family, tmp_path):
    _, hf = hf_model(family)
    ours = M.load_hf(str(_save(hf, tmp_path / "theirs", max_shard_size="20KB")))  # theirs, sharded
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists()
    ours.save_pretrained(str(tmp_path / "ours"), dtype=torch.bfloat16, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = M.GPT.from_pretrained(str(tmp_path / "ours")).eval()
    for k, v in ours.state_dict().items():  # bf16 rounding of our weights, nothing else
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == M.HF_FAMILIES[family][1]
    assert M.hf_config_to_ours(cfg, "x") == ours.config


def _save(hf, d, **kw):
    hf.save_pretrained(d, **kw)
    return d


def test_published_config_layout_reads():
    # the layout of Llama 3.2 1B's config.json on the Hub (rope_scaling, not rope_parameters)
    hf = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072, "num_hidden_layers": 16,
          "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 2048, "intermediate_size": 8192,
          "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
          "hidden_act": "silu", "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    c = M.hf_config_to_ours(hf, "config.json")
    assert (c.family, c.kv_heads, c.hd, c.rope_factor, c.tie_embeddings) == ("llama", 8, 64, 32.0, True)
    pythia = {"model_type": "gpt_neox", "vocab_size": 50304, "max_position_embeddings": 2048, "num_hidden_layers": 16,
              "num_attention_heads": 8, "hidden_size": 2048, "intermediate_size": 8192, "rotary_pct": 0.25,
              "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    c = M.hf_config_to_ours(pythia, "config.json")
    assert (c.family, c.rotary_frac, c.parallel_residual, c.tie_embeddings) == ("pythia", 0.25, True, False)
    with pytest.raises(ValueError, match="config.json: hidden_act"):
        M.hf_config_to_ours({**pythia, "hidden_act": "relu"}, "config.json")
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        M.hf_config_to_ours({**hf, "model_type": "mistral"}, "config.json")
