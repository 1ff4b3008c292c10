"""``slicefleet make-model``: the output loads through the ordinary from_pretrained path."""

from __future__ import annotations

import argparse
import threading


from worker import make_model


def test_output_loads_with_from_pretrained(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    spec = make_model.TEST_SPEC
    assert model.config.model_type == "llama" and model.config.hidden_size == spec.hidden_size
    assert model.config.vocab_size == len(tok) == spec.vocab_size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    text = "How do I bake sourdough bread at home?"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < 0.75 * len(text)  # BPE really merged (even at 1k vocab): trained, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|user|>\nhi</s><|assistant|>\n"
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(ids)


def test_tokenizer_config_loads_in_older_transformers(model_dir):
    """vLLM's venv pins transformers 4.x: the saved config must name a class it knows."""
    import json

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in cfg and "<|user|>" in cfg["additional_special_tokens"]


def test_default_spec_size_and_head_dim():
    """The default model: 10-30 M parameters, head_dim >= 32 (vLLM CPU), 2048 positions. Counted on meta."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = make_model.ModelSpec()
    assert spec.head_dim >= 32 and spec.max_position_embeddings == 2048
    cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                      num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert 10e6 <= n <= 30e6


def test_sharegpt_texts_decode_record_by_record():
    texts = list(make_model.iter_sharegpt_texts(limit=20))
    assert len(texts) >= 20 and all(isinstance(t, str) and t for t in texts)
    # a conversation has several turns, so 20 conversations give more texts than 20
    assert len(list(make_model.iter_sharegpt_texts(limit=1))) < len(texts)


def test_default_model_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(make_model.ENV_MODEL_DIR, str(tmp_path / "m"))
    assert make_model.default_model_dir() == tmp_path / "m"
    monkeypatch.delenv(make_model.ENV_MODEL_DIR)
    assert make_model.default_model_dir().parts[-3:] == ("slicefleet", "models", "tiny-llama")


def test_ensure_model_builds_once_under_concurrency(monkeypatch, tmp_path):
    calls = []
    real = make_model.build_model

    def counting(path, spec=make_model.ModelSpec(), force=False):
        calls.append(path)
        return real(path, make_model.TEST_SPEC, force)

    monkeypatch.setattr(make_model, "build_model", counting)
    monkeypatch.setenv(make_model.ENV_MODEL_DIR, str(tmp_path / "shared"))
    results, errors = [], []

    def worker():
        try:
            results.append(make_model.ensure_default_model())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and results == [tmp_path / "shared"] * 3
    assert make_model.is_complete(tmp_path / "shared")
    assert not [p for p in tmp_path.iterdir() if ".build-" in p.name]  # no temp dirs left behind


def test_cli_run_builds_then_skips(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    make_model.add_arguments(parser)
    out = tmp_path / "cli-model"
    assert make_model.run(parser.parse_args(["--out", str(out), "--tiny"])) == 0
    assert make_model.is_complete(out) and "built" in capsys.readouterr().out
    assert make_model.run(parser.parse_args(["--out", str(out), "--tiny"])) == 0
    assert "already present" in capsys.readouterr().out


def test_build_is_deterministic(tmp_path, model_dir):
    """Fixed seed: every machine builds the very same weights (so profiles and results are comparable)."""
    from safetensors.torch import load_file

    again = make_model.build_model(tmp_path / "again", make_model.TEST_SPEC)
    a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
