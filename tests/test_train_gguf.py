"""train-head's --gguf-file: a GGUF checkpoint, written here from a tiny random Llama with the
``gguf`` package, loads through transformers into the same model (logits equal) and tokenizer."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
pytest.importorskip("transformers")

from haltkit.train.head import load_model  # noqa: E402

CHARS = list("0123456789+=-,.:ABQ")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout of q / k rows (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, seed: int = 0):
    """A 2-layer Llama (hidden 16, 4 heads, 2 KV heads) as an F32 GGUF with a character BPE
    vocabulary; returns the transformers model it was written from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<s>", "</s>"] + CHARS
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(2)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(4)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * len(CHARS))
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none from equal scores
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(2):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _permute(t, 4)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, 2)
        w.add_tensor(gg, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_gguf_file_loads_the_same_model_and_tokenizer(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_model(str(tmp_path), gguf_file="tiny.gguf")
    ids = tok("12+34=46", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("12+34=46")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, src(x).logits, rtol=1e-5, atol=1e-5)


def test_cli_train_head_passes_gguf_file_to_the_loader(tmp_path, monkeypatch):
    import haltkit.train.head as head_mod
    from haltkit.cli import main

    seen = []

    def spy(model_dir, gguf_file=None, dtype=None):
        seen.append((model_dir, gguf_file))
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(head_mod, "load_model", spy)
    (tmp_path / "t.jsonl").write_text('{"prompt": "1+2", "answer": "3"}\n')
    with pytest.raises(RuntimeError, match="stop after loading"):
        main(["train-head", "--model", str(tmp_path), "--gguf-file", "tiny.gguf", "--jsonl", str(tmp_path / "t.jsonl"),
              "--out", str(tmp_path / "out"), "--no-progress"])
    assert seen == [(str(tmp_path), "tiny.gguf")]
