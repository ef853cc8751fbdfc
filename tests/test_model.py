"""gpt2fast.model: presets, Hugging Face compatibility, generation, checkpointing, backends."""
from __future__ import annotations

import json

import pytest
import torch
from ops_testing import DEVICE, ON_GPU, needs_triton

from gpt2fast.model import GPT2, PRESETS, GPT2Config

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> GPT2Config:
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=1000)
    return GPT2Config(**{**base, **overrides})


def random_hf_model(tmp_path, *, safetensors=True, **cfg):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
                                               bos_token_id=999, eos_token_id=999), **cfg})
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make the LayerNorm parameters non-trivial too
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=safetensors)
    return hf


# ------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name, n_params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                            ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_presets_have_gpt2s_parameter_counts(name, n_params):
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset(name), backend="torch")
    assert model.num_params() == n_params
    c = model.config
    assert c.padded_vocab_size == 50304 and c.head_dim == 64 and c.block_size == 1024
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_package_exports_the_model_lazily():
    import gpt2fast

    assert gpt2fast.GPT2 is GPT2 and gpt2fast.GPT2Config is GPT2Config


def test_small_presets_exist_and_build():
    for name in ("gpt2-mini", "gpt2-tiny"):
        model = GPT2(GPT2Config.preset(name), backend="torch")
        assert model.num_params() > 0
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPT2Config(n_layer=0)
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPT2Config.preset("gpt3")
    with pytest.raises(ValueError, match="backend='cuda-ish'"):
        GPT2(tiny_config(), backend="cuda-ish")


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=5000, block_size=64), backend="torch")
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8 layers)
    assert block.attn.c_attn.bias.abs().max() == 0 and block.ln_1.weight.eq(1).all()
    assert model.transformer.wte.weight[5000:].abs().max() == 0  # padding rows


# ----------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("safetensors", [True, False])
def test_logits_match_transformers(tmp_path, safetensors):
    hf = random_hf_model(tmp_path, safetensors=safetensors)
    ours = GPT2.from_pretrained(tmp_path, backend="torch").eval()
    assert ours.config.padded_vocab_size == 1024
    idx = torch.randint(0, 1000, (3, 37))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_loss_matches_transformers(tmp_path):
    hf = random_hf_model(tmp_path)
    ours = GPT2.from_pretrained(tmp_path, backend="torch")
    idx = torch.randint(0, 1000, (2, 33))
    with torch.no_grad():
        expected = hf(idx, labels=idx).loss  # transformers shifts the labels itself
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, expected, rtol=0, atol=2e-5)


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = GPT2(tiny_config(), backend="torch").eval()
    ours.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "gpt2"
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    idx = torch.randint(0, 1000, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=0, atol=2e-5)
    again = GPT2.from_pretrained(tmp_path / "ckpt", backend="torch")
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_checkpoints_without_the_transformer_prefix_load(tmp_path):
    hf = random_hf_model(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=1000), backend="torch")
    ours.load_hf_state_dict(state)
    idx = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=0, atol=2e-5)


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    random_hf_model(tmp_path)
    model = GPT2(tiny_config(n_embd=128), backend="torch")
    from gpt2fast.model import _load_hf_state

    with pytest.raises(ValueError, match=r"wte.weight has shape \(1000, 64\), this model expects \(1000, 128\)"):
        model.load_hf_state_dict(_load_hf_state(tmp_path))
    with pytest.raises(ValueError, match="missing"):
        GPT2(tiny_config(n_layer=3), backend="torch").load_hf_state_dict(_load_hf_state(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2.from_pretrained(tmp_path / "nowhere")


def test_unsupported_hf_variants_are_refused(tmp_path):
    random_hf_model(tmp_path, n_inner=100)
    with pytest.raises(ValueError, match="n_inner=100 is not supported"):
        GPT2.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------- forward
def test_bad_inputs_are_clear_errors():
    model = GPT2(tiny_config(), backend="torch")
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 1000 is outside the model's vocabulary"):
        model(torch.tensor([[1, 1000]]))
    with pytest.raises(ValueError, match="targets have shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_padding_is_never_predicted():
    model = GPT2(tiny_config(vocab_size=1001), backend="torch")
    with torch.no_grad():
        model.transformer.wte.weight[1001:] = 100.0  # would dominate if it leaked into the logits
    logits, loss = model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long),
                         return_logits=True)
    assert logits.shape[-1] == 1001
    assert loss.item() < 10


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = GPT2(tiny_config(), backend="torch")
    b = GPT2(tiny_config(gradient_checkpointing=True), backend="torch")
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 1000, (2, 31))
    for m in (a, b):
        m.train()
        m(idx[:, :-1], idx[:, 1:])[1].backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_block_traces_without_graph_breaks():
    model = GPT2(tiny_config(), backend="torch")
    block = model.transformer.h[0]
    h = torch.randn(2, 16, 64)
    explanation = torch._dynamo.explain(block)(h, torch.randn(2, 16, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.skipif(not ON_GPU, reason="the Triton fast path runs under torch.compile only on a GPU")
def test_triton_block_traces_without_graph_breaks_on_the_gpu():
    block = GPT2(tiny_config(), backend="triton").cuda().to(torch.bfloat16).transformer.h[0]
    h, pending = (torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    explanation = torch._dynamo.explain(block)(h, pending)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@needs_triton
def test_triton_model_matches_torch_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=300)
    # On a GPU machine Triton runs only on CUDA tensors (no interpreter there): both models go to DEVICE.
    ref = GPT2(config, backend="torch").to(DEVICE)
    fast = GPT2(config, backend="triton").to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 300, (2, 17), device=DEVICE)
    losses = []
    for m in (ref, fast):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------- generation
def _greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_kv_cache_generation_equals_recomputing_everything():
    torch.manual_seed(0)
    model = GPT2(tiny_config(block_size=32), backend="torch").eval()
    prompt = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, 20, temperature=0, eot_token=None),
                           _greedy_without_cache(model, prompt, 20))


def test_generation_past_the_context_keeps_going():
    model = GPT2(tiny_config(block_size=16), backend="torch").eval()
    out = model.generate(torch.randint(0, 1000, (1, 10)), 40, temperature=1.0, seed=3, eot_token=None)
    assert out.shape == (1, 50)


@pytest.mark.parametrize("prompt_len", [5, 16, 23], ids=["short-prompt", "full-prompt", "prompt-past-context"])
def test_generation_past_the_context_follows_the_last_block_size_tokens(prompt_len):
    """Past block_size, each token is conditioned on exactly the last block_size tokens (nanoGPT's and Hugging
    Face's rule): greedy output equals recomputing the cropped window at every step, token for token."""
    torch.manual_seed(1)
    model = GPT2(tiny_config(block_size=16), backend="torch").eval()
    prompt = torch.randint(0, 1000, (2, prompt_len))
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, 30, temperature=0, eot_token=None),
                           _greedy_without_cache(model, prompt, 30))


def test_sampling_is_reproducible_and_filters_work():
    torch.manual_seed(0)
    model = GPT2(tiny_config(), backend="torch").eval()
    prompt = torch.randint(0, 1000, (1, 5))
    a = model.generate(prompt, 15, temperature=1.0, seed=7, eot_token=None)
    b = model.generate(prompt, 15, temperature=1.0, seed=7, eot_token=None)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 15, temperature=0, eot_token=None)
    assert torch.equal(model.generate(prompt, 15, top_k=1, seed=1, eot_token=None), greedy)
    assert torch.equal(model.generate(prompt, 15, top_p=1e-6, seed=1, eot_token=None), greedy)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 1, top_p=0.0)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 1)


def test_generation_stops_at_end_of_text():
    model = GPT2(tiny_config(), backend="torch").eval()
    with torch.no_grad():  # the final hidden state becomes all ones, which only token 7 matches
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[7] = 1.0
    out = model.generate(torch.tensor([[1, 2, 3]]), 10, temperature=0, eot_token=7)
    assert out.tolist() == [[1, 2, 3, 7]]
